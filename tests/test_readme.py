"""The README's "use a trained model" example runs as written, on a small run folder."""
from __future__ import annotations

import re
from pathlib import Path

from ppl_vae import cli

README = Path(__file__).resolve().parents[1] / "README.md"


def test_the_use_a_trained_model_example_runs(tmp_path, cached_mnist, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    (code,) = [b for b in blocks if "load_trained(\"runs/amortized\")" in b]
    run = tmp_path / "runs" / "amortized"
    assert cli.main(["train", "--train-size", "300", "--valid-size", "20", "--test-size", "40",
                     "--epochs", "1", "--hidden", "16", "--latent-dim", "3", "--batch-size",
                     "100", "--compile", "off", "--no-progress", "--out", str(run)]) == 0
    monkeypatch.chdir(tmp_path)
    scope = {}
    exec(compile(code, "README.md", "exec"), scope)
    assert scope["loc"].shape == (8, 3) and scope["recon"].shape == (8, 784)
    assert scope["draws"]["x"].shape == (10, 8, 784)
    assert (tmp_path / "decoder.pt").is_file()


def test_every_test_the_docs_cite_exists():
    """A `tests/x.py::name` or `tests/x.py` that README.md or experiments/README.md cites is
    there (five had moved when the tests were laid out by module)."""
    import re
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    cited = set()
    for doc in ("README.md", "experiments/README.md"):
        cited |= set(re.findall(r"tests/(\w+\.py)(?:::(\w+))?", (root / doc).read_text()))
    assert len(cited) > 10  # the pattern finds the citations
    missing = [f"tests/{f}" + (f"::{name}" if name else "") for f, name in sorted(cited)
               if not (root / "tests" / f).is_file()
               or (name and not re.search(rf"^def {name}\(", (root / "tests" / f).read_text(),
                                          re.M))]
    assert not missing
