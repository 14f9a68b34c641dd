"""Bad weights files and bad model names: a CheckpointError/ModelError that names the problem.

Never torch's advice to retry with ``weights_only=False``, never an unsafe unpickle, and
the 90 M-parameter ViT is not built before its checkpoint is found.
"""

from __future__ import annotations

import dataclasses
import io
import os
import pickle
import zipfile

import pytest
import torch

from napari_medsam import MedSAM
from napari_medsam.engine import errors
from napari_medsam.engine.errors import CheckpointError, MedSAMError, ModelError
from napari_medsam.engine.models import checkpoints, registry
from napari_medsam.engine.models.registry import REGISTRY, get_spec, load_weights


@pytest.fixture(scope="module")
def lite_module():
    return get_spec("litemedsam").build()


@pytest.fixture(scope="module")
def lite_path():
    return get_spec("litemedsam").locate_checkpoint()


def _no_unsafe_advice(exc: BaseException) -> None:
    text = str(exc)
    assert "weights_only" not in text and "weights only load failed" not in text.lower(), text
    assert "\n" not in text.strip(), f"one line: {text!r}"


class Boom:
    """A pickle that would run code if loaded unsafely."""

    def __reduce__(self):
        return (os.system, ("echo pwned > /tmp/medsam-pwned",))


def _torch_bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


BAD_FILES = {
    "random_bytes": (lambda: os.urandom(4096), "is not a PyTorch checkpoint"),
    "text": (lambda: b"not a checkpoint" * 100, "is not a PyTorch checkpoint"),
    "empty": (lambda: b"", "is empty"),
    "one_byte": (lambda: b"\x80", "not a PyTorch checkpoint|truncated"),
    "png": (lambda: b"\x89PNG\r\n\x1a\n" + os.urandom(500), "is not a PyTorch checkpoint"),
    "zip_of_text": (lambda: _zip({"a.txt": b"hello"}), "is not a PyTorch checkpoint"),
    "truncated_zip": (lambda: _torch_bytes({"w": torch.zeros(1000)})[:700], "truncated or damaged"),
    "zeroed_tail": (
        lambda: (lambda d: d[:-300] + b"\0" * 300)(_torch_bytes({"w": torch.zeros(1000)})),
        "truncated or damaged|cannot be read",
    ),
    "pickle_of_code": (lambda: pickle.dumps(Boom()), "not a PyTorch checkpoint|Python objects"),
    "torch_file_with_code": (lambda: _torch_bytes({"w": torch.zeros(2), "x": Boom()}), "Python objects"),
    "plain_pickle_dict": (lambda: pickle.dumps({"w": [1, 2]}), "not a PyTorch checkpoint|Python objects"),
    "list": (lambda: _torch_bytes([torch.zeros(2)]), "holds a list, not a state dict"),
    "tensor": (lambda: _torch_bytes(torch.zeros(3)), "holds a Tensor, not a state dict"),
    "int": (lambda: _torch_bytes(3), "holds a int, not a state dict"),
    "empty_dict": (lambda: _torch_bytes({}), "does not fit model 'litemedsam'"),
    "wrong_arch": (lambda: _torch_bytes({"image_encoder.weight": torch.zeros(3)}), "does not fit model 'litemedsam'"),
    "non_tensor_values": (lambda: _torch_bytes({"image_encoder.x": 3}), "does not fit model 'litemedsam'"),
}


def _zip(members) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for k, v in members.items():
            z.writestr(k, v)
    return buf.getvalue()


@pytest.mark.parametrize("kind", sorted(BAD_FILES))
def test_bad_weights_file_is_named_and_never_unpickled(tmp_path, lite_module, kind):
    make, message = BAD_FILES[kind]
    path = tmp_path / "weights.pth"
    path.write_bytes(make())
    if os.path.exists("/tmp/medsam-pwned"):
        os.unlink("/tmp/medsam-pwned")
    with pytest.raises(CheckpointError, match=message) as info:
        load_weights(lite_module, path, "litemedsam")
    _no_unsafe_advice(info.value)
    assert str(path) in str(info.value)
    assert not os.path.exists("/tmp/medsam-pwned"), "a pickle ran code"
    for name in ("litemedsam", "sam_vit_b"):  # through the public API: size check or not, same words
        with pytest.raises(CheckpointError) as info2:
            MedSAM.load(name, device="cpu", checkpoint=str(path))
        _no_unsafe_advice(info2.value)


def test_state_dict_of_another_architecture_names_both(tmp_path, lite_module):
    vit_heads = {k: v for k, v in lite_module.state_dict().items() if not k.startswith("image_encoder.")}
    vit_heads["image_encoder.patch_embed.proj.weight"] = torch.zeros(768, 3, 16, 16)
    path = tmp_path / "sam_like.pth"
    torch.save(vit_heads, path)
    with pytest.raises(CheckpointError, match="does not fit model 'litemedsam'") as info:
        load_weights(lite_module, path, "litemedsam")
    text = str(info.value)
    assert "missing" in text and "unexpected" in text and "image_encoder" in text
    _no_unsafe_advice(info.value)


def test_right_keys_wrong_shapes(tmp_path, lite_module):
    state = {k: torch.zeros(1) for k in lite_module.state_dict()}
    path = tmp_path / "shapes.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=r"does not fit model .litemedsam.*shape") as info:
        load_weights(lite_module, path, "litemedsam")
    _no_unsafe_advice(info.value)


def test_nonfinite_weights_are_refused(tmp_path, lite_module, lite_path):
    state = torch.load(lite_path, map_location="cpu", weights_only=True)
    first = next(k for k, v in state.items() if v.is_floating_point())
    state[first] = state[first].clone()
    state[first].view(-1)[0] = float("nan")
    path = tmp_path / "nan.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match="NaN or infinite"):
        load_weights(get_spec("litemedsam").build(), path, "litemedsam")


def test_wrapped_state_dicts_load(tmp_path, lite_path):
    state = torch.load(lite_path, map_location="cpu", weights_only=True)
    for wrap in ("model", "state_dict"):
        path = tmp_path / f"{wrap}.pth"
        torch.save({wrap: state, "epoch": 3}, path)
        load_weights(get_spec("litemedsam").build(), path, "litemedsam")


@pytest.mark.parametrize("how", ["explicit", "env"])
def test_directory_as_checkpoint_says_directory(tmp_path, monkeypatch, how):
    folder = tmp_path / "weights"
    folder.mkdir()
    kw = {}
    if how == "env":
        monkeypatch.setenv("NAPARI_MEDSAM_LITEMEDSAM", str(folder))
    else:
        kw["checkpoint"] = str(folder)
    with pytest.raises(CheckpointError, match="is a directory") as info:
        MedSAM.load("litemedsam", device="cpu", **kw)
    assert "does not exist" not in str(info.value)


def test_missing_and_unreadable_checkpoint(tmp_path, monkeypatch):
    with pytest.raises(CheckpointError, match="does not exist"):
        MedSAM.load("litemedsam", device="cpu", checkpoint=str(tmp_path / "nope.pth"))
    path = tmp_path / "w.pth"
    path.write_bytes(b"x" * 10)
    real_open = open

    def denied(p, *a, **k):
        if str(p) == str(path):
            raise PermissionError(13, "Permission denied", str(p))
        return real_open(p, *a, **k)

    monkeypatch.setattr("builtins.open", denied)
    with pytest.raises(CheckpointError, match=r"cannot be read.*Permission denied"):
        checkpoints.verify(path, checkpoints.CheckpointSource("w.pth"))


def test_litemedsam_size_mismatch_keeps_both_facts(tmp_path):
    path = tmp_path / "lite.pth"
    path.write_bytes(b"not a checkpoint" * 100)
    with pytest.raises(CheckpointError, match="not a PyTorch checkpoint") as info:
        MedSAM.load("litemedsam", device="cpu", checkpoint=str(path))
    assert "1,600 bytes, expected 39,370,479" in str(info.value)


@pytest.mark.parametrize("name", ["nosuch", "", "  ", "vit_b", "litemedsam2", "sam_vit_x", "../litemedsam"])
def test_unknown_model_name_is_a_model_error_listing_names(name):
    with pytest.raises(ModelError) as info:
        MedSAM.load(name, device="cpu", weights="random")
    text = str(info.value)
    assert "unknown model" in text and all(k in text for k in REGISTRY), text
    assert not text.startswith("'"), "not KeyError's quoted form"
    assert isinstance(info.value, KeyError), "old `except KeyError` callers keep working"


@pytest.mark.parametrize("name", [None, 3, b"litemedsam", ["litemedsam"]])
def test_model_name_that_is_not_text(name):
    with pytest.raises(ModelError, match="model name"):
        get_spec(name)


@pytest.mark.parametrize("alias", ["LiteMedSAM", "lite-medsam", "lite_medsam", "MedSAM_ViT_B", " litemedsam "])
def test_known_aliases_resolve(alias):
    assert get_spec(alias).name in ("litemedsam", "medsam")


def test_bad_weights_option_is_a_model_error():
    with pytest.raises(ModelError, match="weights must be"):
        MedSAM.load("litemedsam", device="cpu", weights="imagenet")


def test_medsam_without_weights_fails_before_building_the_vit(tmp_path, monkeypatch):
    monkeypatch.setenv(checkpoints.ENV_DIR, str(tmp_path))
    monkeypatch.delenv("NAPARI_MEDSAM_MEDSAM", raising=False)
    built = []

    def counting_build():
        built.append(1)
        raise AssertionError("the ViT was built before the checkpoint was found")

    for name in ("medsam", "sam_vit_b", "sam_vit_h"):
        monkeypatch.setitem(REGISTRY, name, dataclasses.replace(REGISTRY[name], build=counting_build))
        monkeypatch.delenv(REGISTRY[name].checkpoint.env_var, raising=False)
        with pytest.raises(CheckpointError, match="no checkpoint found"):
            MedSAM.load(name, device="cpu")
        with pytest.raises(CheckpointError, match="is a directory"):
            MedSAM.load(name, device="cpu", checkpoint=str(tmp_path))
    assert built == []


def test_every_engine_error_derives_from_medsam_error():
    classes = [v for v in vars(errors).values() if isinstance(v, type) and issubclass(v, BaseException)]
    assert len(classes) >= 6
    assert all(issubclass(c, MedSAMError) for c in classes)
    assert issubclass(registry.UnknownModelError, ModelError)
