"""Only ``callbacks/`` and ``lightning_modules.py`` import Lightning: everything else works with Lightning made
unimportable (issue 11, point 5)."""

import ast
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import lightning_lens

PACKAGE = Path(lightning_lens.__file__).parent
LIGHTNING = ("pytorch_lightning", "lightning", "lightning_fabric")
# the Lightning-facing parts, relative to the package; _pl.py is the one place that names the namespace
ALLOWED = ("callbacks/", "lightning_modules.py", "_pl.py")
LIGHTNING_NAMES = {"LitClassifier", "ConceptBottleneckModule"}  # lazy exports that live in lightning_modules

WITHOUT_LIGHTNING = textwrap.dedent(
    """
    import importlib, pkgutil, sys

    BLOCKED = {blocked!r}

    class NoLightning:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ModuleNotFoundError(f"No module named {{name!r}} (blocked by the isolation test)")
            return None

    sys.meta_path.insert(0, NoLightning())

    import lightning_lens

    SKIP = {{"lightning_lens.callbacks", "lightning_lens.lightning_modules", "lightning_lens._pl"}}
    imported = []

    def walk(package):
        for info in pkgutil.iter_modules(package.__path__, package.__name__ + "."):
            if info.name in SKIP:
                continue
            module = importlib.import_module(info.name)
            imported.append(info.name)
            if info.ispkg:
                walk(module)

    walk(lightning_lens)
    # every public name of every subpackage, lazy exports included (they import their submodule on access)
    for name in list(imported):
        module = sys.modules[name]
        for attr in getattr(module, "__all__", []):
            if attr not in {lightning_names!r}:
                getattr(module, attr)

    # a tiny pure-PyTorch use of each part
    import numpy as np
    import torch
    from torch import nn

    from lightning_lens.attribution import Gradient
    from lightning_lens.evaluation import relevance_mass_accuracy
    from lightning_lens.loggers import sanitize_tag, table_to_markdown
    from lightning_lens.render import to_rgb_uint8
    from lightning_lens.sanity import cascading_randomization
    from lightning_lens.slices import find_slices
    from lightning_lens.testing import SmallCNN

    torch.manual_seed(0)
    linear = nn.Linear(3, 2)
    grads = Gradient(linear).attribute(torch.randn(4, 3), target=1)
    assert torch.allclose(grads, linear.weight[1].expand(4, 3))

    report = cascading_randomization(SmallCNN(width=2), torch.rand(2, 1, 32, 32), methods=["gradient", "edge"])
    assert report.verdicts["edge"].outcome == "fails"  # the model-independent control must fail

    masks = torch.zeros(1, 1, 4, 4); masks[..., :2, :2] = 1
    assert relevance_mass_accuracy(torch.ones(1, 1, 4, 4), masks).value == 0.25

    rng = np.random.default_rng(0)
    site = rng.choice(["a", "b", "c"], 600)
    errors = rng.random(600) < np.where(site == "b", 0.6, 0.05)
    assert find_slices(errors, {{"site": site}})[0].name == "site=b"

    assert to_rgb_uint8(torch.ones(1, 2, 2)).tolist() == [[[255] * 3] * 2] * 2
    assert sanitize_tag("a/../x") == "a/x" and "&lt;b&gt;" in table_to_markdown(["c"], [["<b>"]])

    leaked = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
    assert not leaked, leaked
    print("imported", len(imported), "modules without Lightning")
    """
)


def test_everything_but_callbacks_works_without_lightning(tmp_path):
    script = tmp_path / "no_lightning.py"
    script.write_text(WITHOUT_LIGHTNING.format(blocked=set(LIGHTNING), lightning_names=LIGHTNING_NAMES))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(PACKAGE.parent), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "modules without Lightning" in done.stdout


def test_the_blocker_really_blocks_lightning(tmp_path):
    """The import of a Lightning-facing name fails in the same subprocess setup: the test above would notice."""
    script = tmp_path / "blocked.py"
    blocker = WITHOUT_LIGHTNING.format(blocked=set(LIGHTNING), lightning_names=LIGHTNING_NAMES)
    script.write_text(blocker.split("import lightning_lens")[0] + textwrap.dedent(
        """
        from lightning_lens.testing import SmallCNN  # fine
        try:
            from lightning_lens.testing import LitClassifier
        except ModuleNotFoundError as err:
            print("blocked:", err)
        """
    ))
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "blocked: No module named 'pytorch_lightning'" in done.stdout


def _lightning_imports(path: Path) -> list[str]:
    """Modules named by the import statements of ``path`` that reach Lightning (directly or through ``_pl``)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            names = [base] + [f"{base}.{alias.name}" if base else alias.name for alias in node.names]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] in LIGHTNING or "_pl" in parts:
                found.append(name)
    return found


def test_only_the_allowed_files_import_lightning():
    offenders = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE).as_posix()
        if relative.startswith(ALLOWED[0]) or relative in ALLOWED[1:]:
            continue
        found = _lightning_imports(path)
        if found:
            offenders[relative] = found
    assert offenders == {}
    # and the allowed Lightning-facing module does import it (the check looks at the right things)
    assert _lightning_imports(PACKAGE / "lightning_modules.py")
    assert _lightning_imports(PACKAGE / "_pl.py") == ["pytorch_lightning", "pytorch_lightning",
                                                      "pytorch_lightning.Callback", "pytorch_lightning.LightningModule",
                                                      "pytorch_lightning.Trainer", "pytorch_lightning.utilities",
                                                      "pytorch_lightning.utilities.rank_zero_warn"]


def test_public_names_of_the_lightning_modules_are_the_old_ones():
    from lightning_lens import lightning_modules
    from lightning_lens.interpretable_models import ConceptBottleneckModule
    from lightning_lens.testing import LitClassifier

    assert LitClassifier is lightning_modules.LitClassifier
    assert ConceptBottleneckModule is lightning_modules.ConceptBottleneckModule
    assert not (PACKAGE / "testing" / "lit.py").exists()
    assert not (PACKAGE / "interpretable_models" / "concept_module.py").exists()
