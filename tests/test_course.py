"""docs/course.md: every command of every lesson runs, at a tiny scale (a tiny random BERT, two
steps), so that a change to the code cannot silently break a lesson. The commands are read from the
course itself, in order; only the model and the number of steps change."""
import os
import re
import subprocess

import pytest

from conftest import ROOT

COURSE_MD = os.path.join(ROOT, "docs", "course.md")


def lessons():
    """[(title, [command, ...])]: the lines of each section's bash blocks (the set-up before the
    first lesson, then the lessons), comments and pip left out."""
    with open(COURSE_MD) as f:
        text = f.read()
    found = []
    for part in re.split(r"^## ", text, flags=re.M)[1:]:
        title = part.splitlines()[0]
        blocks = re.findall(r"^```bash\n(.*?)^```", part, flags=re.M | re.S)
        commands = []
        for block in blocks:
            for line in block.splitlines():
                line = re.sub(r"\s+#.*$", "", line).strip()  # a comment after the command
                if line and not line.startswith(("#", "pip ")):
                    commands.append(line)
        if commands:
            found.append((title, commands))
    return found


def tiny(command, model):
    """The command at a tiny scale: the tiny model, two training steps of 8 queries."""
    if "bash experiments/course.sh" in command:  # perhaps after DATASET=nfcorpus
        return f"{command} --model {model} --max_steps 2 --batch_size 8"
    if command.startswith("python experiments/course_dist.py"):
        return f"{command} --model {model} --steps 1"
    starts_at_model = command.startswith(("python evaluate.py", "python mine.py"))
    if starts_at_model and "--model" not in command and "--emb" not in command:
        return f"{command} --model {model}"
    return command


def test_the_course_has_its_lessons():
    titles = [title for title, _ in lessons()]
    assert sum(title.startswith("Lesson") for title in titles) >= 6, titles
    assert titles[0] == "Before the first lesson", titles


@pytest.fixture(scope="module")
def course(tmp_path_factory):
    return str(tmp_path_factory.mktemp("course"))


@pytest.mark.parametrize("lesson", range(len(lessons())), ids=lambda i: f"part{i}")
def test_lesson_runs(lesson, course, tiny_model):
    """Each lesson's commands in order, in one course folder shared by the lessons (a lesson may use
    what an earlier one made, as a student's would)."""
    title, commands = lessons()[lesson]
    env = {**os.environ, "COURSE": course, "OMP_NUM_THREADS": "1"}
    for command in commands:
        command = tiny(command.replace("runs/course", course), tiny_model)
        p = subprocess.run(["bash", "-c", command], cwd=ROOT, env=env, capture_output=True,
                           text=True, timeout=900)
        assert p.returncode == 0, f"{title}: {command}\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}"
