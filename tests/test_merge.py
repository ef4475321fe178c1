"""merge.py: the weighted average of checkpoints, by hand; what cannot be averaged is a one-line
error."""
import signal
import subprocess
import sys

import pytest
import torch

import cli
import merge
from conftest import ROOT
from model import BiEncoder


def files(folder):
    """folder -> {path inside it: bytes}, for comparing two checkpoints byte for byte."""
    return {str(f.relative_to(folder)): f.read_bytes() for f in folder.rglob("*") if f.is_file()}


def merge_main(*flags):
    return merge.main(merge.parser.parse_args(list(map(str, flags))))


@pytest.fixture(scope="module")
def two(tiny_model, tmp_path_factory):
    """The tiny BERT as it is, and with every weight moved: two checkpoints of one architecture."""
    folder = tmp_path_factory.mktemp("two")
    a = BiEncoder(tiny_model)
    a.save(str(folder / "a"))
    torch.manual_seed(1)
    with torch.no_grad():
        for param in a.parameters():
            param.add_(torch.randn_like(param))
    a.save(str(folder / "b"))
    return str(folder / "a"), str(folder / "b")


def test_the_merge_is_the_weighted_average(two, tmp_path):
    merge_main("--models", *two, "--weights", 3, 1, "--out", tmp_path / "m")
    a, b = (BiEncoder(path).state_dict() for path in two)
    merged = BiEncoder(str(tmp_path / "m")).state_dict()
    assert merged.keys() == a.keys()
    for name in a:
        assert torch.allclose(merged[name], 0.75 * a[name] + 0.25 * b[name], atol=1e-6), name
    merge_main("--models", *two, "--out", tmp_path / "equal")  # default: equal weights
    equal = BiEncoder(str(tmp_path / "equal")).state_dict()
    assert all(torch.allclose(equal[n], (a[n] + b[n]) / 2, atol=1e-6) for n in a)


@pytest.mark.parametrize("case, says", [
    ("one", "--models: give two or more checkpoints"),
    ("weights", "--weights: 3 weights for 2 models"),
    ("architecture", "another architecture than"),
    ("pooling", "pooling 'cls', not 'mean'"),
])
def test_what_cannot_be_merged_is_refused(two, tmp_path, case, says):
    models = list(two)
    extra = []
    if case == "one":
        models = models[:1]
    elif case == "weights":
        extra = ["--weights", 1, 1, 1]
    elif case == "architecture":
        models[1] = cli.default_model()  # MiniLM: 6 layers, 384 wide
    else:
        BiEncoder(two[1], pooling="cls").save(str(tmp_path / "cls"))
        models[1] = str(tmp_path / "cls")
    with pytest.raises(cli.InputError, match=says):
        merge_main("--models", *models, *extra, "--out", tmp_path / "m")


def test_a_merge_killed_before_its_folder_is_swapped_in(two, tmp_path):
    """SIGKILL once the new merge is written beside the old one: the old merge is untouched, and
    the same command again gives the files of an uninterrupted run, with nothing left beside."""
    merge_main("--models", *two, "--weights", 3, 1, "--out", tmp_path / "m")
    before = files(tmp_path / "m")
    merge_main("--models", *two, "--out", tmp_path / "full")
    # merge.py with its save slowed down: the process is killed after writing m.tmp
    slow = ("import runpy, sys, time\n"
            "sys.path.insert(0, sys.argv[1])\n"
            "import model\n"
            "save = model.BiEncoder.save\n"
            "def slow_save(self, path):\n"
            "    save(self, path)\n"
            "    print('saved', flush=True)\n"
            "    time.sleep(60)\n"
            "model.BiEncoder.save = slow_save\n"
            "sys.argv = ['merge.py'] + sys.argv[2:]\n"
            "runpy.run_path(sys.argv[0], run_name='__main__')\n")
    command = ["--models", *two, "--out", str(tmp_path / "m")]
    p = subprocess.Popen([sys.executable, "-c", slow, ROOT, *command], cwd=ROOT,
                         stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "saved"
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert files(tmp_path / "m") == before
    subprocess.run([sys.executable, "merge.py", *command], cwd=ROOT, check=True,
                   capture_output=True)
    assert sorted(f.name for f in tmp_path.iterdir()) == ["full", "m"]
    assert files(tmp_path / "m") == files(tmp_path / "full")
