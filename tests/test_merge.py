"""merge.py: the weighted average of checkpoints, by hand; what cannot be averaged is a one-line
error."""
import pytest
import torch

import cli
import merge
from model import BiEncoder


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
