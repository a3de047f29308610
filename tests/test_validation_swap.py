"""A layer directory replaced between validation and the mount's open of its root.

``config.validate`` checks paths (directories, not nested, not the same directory twice, the
upper not read-only...); the roots are opened after it. A directory swapped in between (a
rename over its path by whoever can write its parent) would be served unchecked: the mount
refuses a root that is not the object validation saw (``LayerStack``'s ``checked``)."""
from __future__ import annotations

import errno
import os

import pytest

from overlaypc.config import MountConfig, validate
from overlaypc.core import OverlayFS


def _config(tmp_path) -> MountConfig:
    for d in ("lower", "upper", "work"):
        (tmp_path / d).mkdir()
    (tmp_path / "lower" / "f").write_text("checked\n")
    cfg = MountConfig(lowers=[str(tmp_path / "lower")], upper=str(tmp_path / "upper"),
                      work=str(tmp_path / "work"), mountpoint=str(tmp_path))
    validate(cfg)
    return cfg


@pytest.mark.parametrize("which", ["lower", "upper", "work"])
def test_a_layer_replaced_after_validation_is_refused(tmp_path, which):
    cfg = _config(tmp_path)
    # another directory renamed over the checked one's path after the checks
    os.rename(tmp_path / which, tmp_path / f"{which}.checked")
    (tmp_path / which).mkdir()
    with pytest.raises(OSError) as caught:
        OverlayFS(cfg).close()
    assert caught.value.errno == errno.ESTALE
    assert "replaced while the mount was being set up" in caught.value.strerror
    assert caught.value.filename == str(tmp_path / which)


def test_the_checked_layers_mount(tmp_path):
    cfg = _config(tmp_path)
    assert set(cfg.checked) == {str(tmp_path / d) for d in ("lower", "upper", "work")}
    fs = OverlayFS(cfg)
    try:
        assert [layer.path for layer in fs.stack.lowers] == [str(tmp_path / "lower")]
    finally:
        fs.close()
