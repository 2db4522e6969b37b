"""r1pipe: train reasoning models the way DeepSeek-R1 was trained, on its own DeepSeek-V3."""
from pathlib import Path as _Path

__version__ = "0.1.0"

# model/ and rewards/ live at the repository root and install as r1pipe.model / r1pipe.rewards
# (setuptools package-dir). When r1pipe is imported straight from a source checkout (cwd on
# sys.path), let those subpackages resolve from the root as well.
_root = _Path(__file__).resolve().parent.parent
if (_root / "pyproject.toml").is_file() and (_root / "model" / "__init__.py").is_file():
    __path__.append(str(_root))  # type: ignore[name-defined]
