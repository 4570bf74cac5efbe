"""Native save / load of an elastic adapter and its rank layout: safetensors + JSON, never pickle."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import save
from torch import nn

from .attach import ATTACHED_ATTR, attach, elastic_layers, unwrap, without_unmatched_entries
from .config import DynaRankConfig, is_positive_number
from .files import RunFileError, read_json, read_safetensors, sibling_directory, write_synced
from .naming import uncompiled

LAYOUT_FILE = "dynarank_adapter.json"
WEIGHTS_FILE = "dynarank_adapter.safetensors"
FORMAT_VERSION = 1

logger = logging.getLogger(__name__)


class AdapterFormatError(ValueError):
    """A saved adapter is missing, damaged, or does not fit the model it is loaded into."""


def adapter_state(model: nn.Module) -> tuple[dict, dict[str, torch.Tensor]]:
    """(layout JSON, tensors) describing every adapter and trained module of ``model`` (of the model a
    ``torch.compile`` wrapper holds: the names are the uncompiled model's)."""
    model = uncompiled(model)
    config: DynaRankConfig | None = getattr(model, ATTACHED_ATTR, None)
    if config is None:
        raise ValueError("this model carries no dynarank adapter (use dynarank.attach first).")
    layers, tensors = {}, {}
    for name, layer in elastic_layers(model).items():
        layers[name] = {
            "split": layer.split,
            "layout": layer.layout,
            "n_groups": layer.n_groups,
            "group_size": layer.group_size,
            "in_features": layer.in_features,
            "out_features": layer.out_features,
            "scaling": layer.scaling,
            "slots": layer.slots,
        }
        tensors[f"{name}.shared_weight"] = layer.shared_weight.detach()
        # A controller's gate (ARD's mask, ElaLoRA/AdaLoRA's E before the end of training) is folded in,
        # so the saved adapter gives the same outputs without the controller.
        tensors[f"{name}.group_weight"] = layer.gated_group_weight().detach()
    save_names = list(getattr(model, "dynarank_modules_to_save", []))
    for name in save_names:
        for pname, p in model.get_submodule(name).named_parameters():
            tensors[f"{name}.{pname}"] = p.detach()
    layout = {
        "format_version": FORMAT_VERSION,
        "config": config.to_dict(),
        "layers": layers,
        "modules_to_save": save_names,
    }
    return layout, {k: v.to("cpu").contiguous().clone() for k, v in tensors.items()}


# Written beside a PEFT adapter by the CLI (runs.py): part of what dynarank puts in an adapter directory.
_write_synced = write_synced  # the one writer of write_atomically (tests stand in for it to simulate a kill)


def _sync_directory(path: Path) -> None:
    """Force a directory's entries (created files, renames) to disk; a no-op where directories cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # Windows
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ``.<name>.<random>.old``: a directory's previous content, moved aside by write_atomically (mkdtemp's random
# part has no dots, so the name is everything before it).
MOVED_ASIDE = re.compile(r"^\.(.+)\.[a-z0-9_]+\.old$")


def _moved_aside(out: Path) -> list[Path]:
    """The moved-aside siblings of ``out``."""
    if not out.parent.is_dir():
        return []
    return sorted(
        p for p in out.parent.iterdir() if p.is_dir() and (m := MOVED_ASIDE.match(p.name)) and m.group(1) == out.name
    )


def interrupted_replacements(parent: str | os.PathLike) -> list[Path]:
    """The directories in ``parent`` that have a previous version moved aside by a replacement (killed, or in
    progress): what :func:`restore_interrupted` may put back."""
    parent = Path(parent)
    if not parent.is_dir():
        return []
    return sorted({parent / m.group(1) for p in parent.iterdir() if p.is_dir() and (m := MOVED_ASIDE.match(p.name))})


def restore_interrupted(out_dir: str | os.PathLike, marker: str) -> bool:
    """Put back the previous ``out_dir`` that a replacement killed between its two renames left aside.

    Only when ``out_dir`` is missing and exactly one hidden ``.<name>.<random>.old`` sibling holds ``marker``
    (a file that kind of directory always has); the new directory's temporary sibling, if still there, is
    removed. Returns True when something was restored. Loads and :func:`write_atomically` call it first. A symbolic
    link stands for the directory it points to.
    """
    out = _through_link(Path(out_dir))
    if out.exists() or out.is_symlink():
        return False
    found = [p for p in _moved_aside(out) if (p / marker).is_file()]
    if len(found) != 1:
        if found:
            logger.warning(
                "dynarank: %s is missing and several interrupted saves left a previous version of it (%s); "
                "none was restored: rename the one you want to %s.",
                out,
                ", ".join(p.name for p in found),
                out.name,
            )
        return False
    old = found[0]
    old.rename(out)
    _sync_directory(out.parent)
    unfinished = old.with_name(old.name[: -len(".old")])
    if unfinished.is_dir():
        shutil.rmtree(unfinished, ignore_errors=True)
    logger.warning("dynarank: a save of %s was interrupted while replacing it; its previous version is restored.", out)
    return True


def _through_link(path: Path) -> Path:
    """The directory a symbolic link ``path`` points to (through every link of a chain), or ``path`` itself."""
    return Path(os.path.realpath(path)) if path.is_symlink() else path


def refuse_unreplaceable(out: Path) -> None:
    """Refuse, before anything is written, an ``out`` that cannot be replaced as a whole: the working directory or a
    folder that holds it (moved aside and deleted, it would take the process's working directory with it), or an
    existing file that is not a directory."""
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} is a file, not a directory; refusing to overwrite it: write to a directory.")
    try:
        where = Path.cwd().resolve()
    except OSError:  # the working directory was deleted: nothing can hold it
        return
    if out.resolve() in (where, *where.parents):
        raise ValueError(
            f"{str(out)!r} is the working directory {where} or holds it: an adapter or checkpoint directory is "
            "replaced as a whole, which cannot be done to the directory a process works in; write to a new "
            f"directory (e.g. {os.path.join(str(out), 'adapter')!r})."
        )


def write_atomically(
    out_dir: str | os.PathLike,
    files: dict[str, bytes | dict],
    marker: str | None = None,
    companions: tuple[str, ...] = (),
) -> Path:
    """Write ``files`` into a temporary sibling directory, then rename it to ``out_dir``.

    An existing ``out_dir`` is replaced only when it is empty or holds ``marker`` (a file the same kind of
    directory always has; default: the first of ``files``) and nothing but files dynarank writes there: a
    user's folder, or a user's file put beside an adapter, is never deleted (FileExistsError names it).

    What a failure leaves. The files and the temporary directory are synced to disk before anything is
    renamed, and the parent directory after, so ``out_dir`` only ever holds a complete directory:

    * an error or a kill while writing leaves ``out_dir`` as it was (a kill may leave the hidden temporary
      ``.<name>.<random>`` sibling; checkpoint saves remove those);
    * replacing an existing ``out_dir`` takes two renames (POSIX has no atomic swap of directories): the
      previous one goes to ``.<name>.<random>.old``, then the new one into place. An error in the second
      rename puts the previous one back before the error propagates. A kill between the two (or a failure to
      put it back) leaves ``out_dir`` missing and its previous content, complete, in the ``.old`` sibling:
      the next ``write_atomically`` of ``out_dir``, or the next load of it by this library (adapters,
      checkpoints), restores it first (:func:`restore_interrupted`).

    The new directory gets the permissions an ordinary ``mkdir`` gets under the umask. An ``out_dir`` that is a
    symbolic link to a directory is written through: the directory it points to is replaced, the link kept. The
    working directory, a folder that holds it, and a file that is not a directory are refused before anything is
    written (:func:`refuse_unreplaceable`).
    """
    given = Path(out_dir)
    out = _through_link(given)
    refuse_unreplaceable(out)
    marker = marker or next(iter(files))
    restore_interrupted(out, marker)
    if out.exists():
        if not out.is_dir() or (any(out.iterdir()) and not (out / marker).exists()):
            raise FileExistsError(f"{out} exists and is not a directory this library wrote; refusing to overwrite it.")
        foreign = sorted(p.name for p in out.iterdir() if p.name not in files and p.name not in companions)
        if foreign:
            raise FileExistsError(
                f"{out} holds files dynarank did not write ({', '.join(foreign[:3])}); refusing to replace the "
                "directory: move them, or write to another directory."
            )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = sibling_directory(out)
    old = tmp.with_name(tmp.name + ".old")
    try:
        for fname, content in files.items():
            data = save(content, metadata={"format": "pt"}) if isinstance(content, dict) else content
            _write_synced(tmp / fname, data)
        _sync_directory(tmp)
        if out.exists():
            out.rename(old)  # kept until the new directory is in place
        try:
            tmp.rename(out)
        except BaseException:
            if old.exists() and not out.exists():
                old.rename(out)  # the previous directory comes back
            raise
        _sync_directory(out.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
        if old.exists() and out.exists():  # never the only copy: without out_dir, restore_interrupted needs it
            shutil.rmtree(old)
    return given


def _layout_digest(layout: dict) -> str:
    """sha256 of the layout's content without its own digest (canonical JSON)."""
    body = {k: v for k, v in layout.items() if k != "layout_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def save_adapter(model: nn.Module, out_dir: str | os.PathLike) -> Path:
    """Save adapters, their current ranks and the task head to ``out_dir`` (atomic). The layout file records the
    sha256 of the weights file and of its own content, so that a damaged or edited adapter is refused on load."""
    layout, tensors = adapter_state(model)
    weights = save(tensors, metadata={"format": "pt"})
    layout["weights_sha256"] = hashlib.sha256(weights).hexdigest()
    layout["layout_sha256"] = _layout_digest(layout)
    return write_atomically(
        out_dir,
        {LAYOUT_FILE: json.dumps(layout, indent=1).encode(), WEIGHTS_FILE: weights},
        marker=LAYOUT_FILE,
    )


def read_adapter(path: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """Read (layout, tensors) from a native adapter directory, verified against its checksums, with clear errors.

    A directory that holds any pickle file is refused before anything in it is read (safe_load.UnsafeFolderError).
    An adapter saved before the checksums were recorded (same format version) is read with a warning."""
    from .safe_load import pickle_files, require_safetensors  # safe_load imports this module

    path = Path(path)
    restore_interrupted(path, LAYOUT_FILE)
    layout_file, weights_file = path / LAYOUT_FILE, path / WEIGHTS_FILE
    if not layout_file.is_file() or not (weights_file.is_file() or pickle_files(path)):
        raise AdapterFormatError(
            f"{path} is not a dynarank adapter directory: expected {LAYOUT_FILE} and {WEIGHTS_FILE}."
        )
    require_safetensors(path, "native adapter")  # a pickle beside the weights, or in their place, is named
    try:
        layout = read_json(layout_file)
    except RunFileError as exc:
        raise AdapterFormatError(str(exc)) from None
    if layout.get("format_version") != FORMAT_VERSION:
        raise AdapterFormatError(f"{layout_file}: unsupported format (expected format_version {FORMAT_VERSION}).")
    if "layout_sha256" in layout and layout["layout_sha256"] != _layout_digest(layout):
        raise AdapterFormatError(f"{layout_file} does not match its checksum: the file is damaged or was modified.")
    if "weights_sha256" not in layout:
        logger.warning("dynarank: %s records no checksum (saved by an older dynarank): not verified.", layout_file)
    return layout, read_safetensors(weights_file, AdapterFormatError, layout.get("weights_sha256"))


def _check_fits(model: nn.Module, saved: dict, heads: list[str] = ()) -> None:
    """Every saved module must exist in ``model`` as a Linear of the saved shape, and every module saved whole
    (``heads``: the task head, modules_to_save) as a module."""
    modules = dict(model.named_modules())
    missing = [n for n in saved if not isinstance(modules.get(n), nn.Linear)]
    if missing:
        raise AdapterFormatError(
            f"adapter does not fit this {type(model).__name__}: it has no Linear module {missing[0]!r}"
            f"{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}."
        )
    for name, info in saved.items():
        linear = modules[name]
        if (linear.in_features, linear.out_features) != (info["in_features"], info["out_features"]):
            raise AdapterFormatError(
                f"{name}: the adapter was trained on Linear({info['in_features']}, {info['out_features']}), "
                f"this model has Linear({linear.in_features}, {linear.out_features})."
            )
    absent = [n for n in heads if n not in modules]
    if absent:
        raise AdapterFormatError(
            f"adapter does not fit this {type(model).__name__}: it holds the trained module {absent[0]!r} (a task "
            "head, or modules_to_save), which this model does not have; load it into the model class it was "
            "trained on."
        )


def load_adapter(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Attach the saved adapter to a freshly built base ``model`` and restore ranks and values exactly.

    The layout is checked against ``model`` before anything is attached: a mismatch raises
    :class:`AdapterFormatError` and leaves the model untouched; so does a model that carries dynarank adapters
    already. A ``torch.compile``'d model takes the adapter in the model it compiled (the names the adapter was saved
    with), and is returned as given.
    """
    given, model = model, uncompiled(model)
    if getattr(model, ATTACHED_ATTR, None) is not None or elastic_layers(model):
        raise AdapterFormatError(
            f"{path}: cannot be loaded into this {type(model).__name__}: it already carries dynarank adapters, and "
            "load_adapter() attaches the saved one to a base model. Load it into a freshly built base model (or take "
            "the adapters off first: dynarank.attach.unwrap(model, merge=False))."
        )
    layout, tensors = read_adapter(path)
    try:
        config = DynaRankConfig.from_dict(layout["config"])
        saved = layout["layers"]
        heads = [str(name) for name in layout.get("modules_to_save", [])]
    except (KeyError, TypeError, ValueError) as exc:
        raise AdapterFormatError(f"{path}: the adapter description is damaged ({exc}).") from None
    try:
        _check_fits(model, saved, heads)
    except AdapterFormatError as exc:
        raise AdapterFormatError(f"{path}: {exc}") from None
    flags = {id(p): p.requires_grad for p in model.parameters()}
    config = without_unmatched_entries(model, config)  # a name saved before those were refused chose nothing
    try:
        attach(model, config)
    except ValueError as exc:
        raise AdapterFormatError(f"adapter does not fit this {type(model).__name__}: {exc}") from None
    try:
        _restore(model, layout, tensors)
    except Exception:
        unwrap(model, merge=False)  # a mismatch found after attaching: give the model back untouched
        for p in model.parameters():
            p.requires_grad_(flags.get(id(p), p.requires_grad))
        raise
    return given


def _restore(model: nn.Module, layout: dict, tensors: dict[str, torch.Tensor]) -> None:
    """Give the freshly attached layers the saved layout and values (AdapterFormatError on a mismatch)."""
    saved = layout["layers"]
    layers = elastic_layers(model)
    if set(saved) != set(layers):
        missing, extra = sorted(set(saved) - set(layers)), sorted(set(layers) - set(saved))
        raise AdapterFormatError(
            f"adapter does not fit this model: saved modules not in the model {missing[:5]}, "
            f"model modules not in the adapter {extra[:5]}."
        )
    for name, layer in layers.items():
        info = saved[name]
        if (info["in_features"], info["out_features"], info["n_groups"]) != (
            layer.in_features,
            layer.out_features,
            layer.n_groups,
        ):
            raise AdapterFormatError(
                f"{name}: saved Linear({info['in_features']}, {info['out_features']}) with {info['n_groups']} "
                f"groups, model has Linear({layer.in_features}, {layer.out_features}) with {layer.n_groups}."
            )
        layer.set_slots(info["slots"])
        scaling = info.get("scaling", layer.scaling)  # the scale it trained with, whatever the defaults are now
        if not is_positive_number(scaling):
            raise AdapterFormatError(f"{name}: the saved output scale {scaling!r} is not a positive number.")
        layer.scaling = float(scaling)
    expected = {}
    for name, layer in layers.items():
        expected[f"{name}.shared_weight"] = layer.shared_weight
        expected[f"{name}.group_weight"] = layer.group_weight
    for name in layout.get("modules_to_save", []):
        for pname, p in model.get_submodule(name).named_parameters():
            expected[f"{name}.{pname}"] = p
    if set(expected) != set(tensors):
        raise AdapterFormatError(
            f"tensor names do not match: missing {sorted(set(expected) - set(tensors))[:5]}, "
            f"unexpected {sorted(set(tensors) - set(expected))[:5]}."
        )
    with torch.no_grad():
        for key, param in expected.items():
            value = tensors[key]
            if value.shape != param.shape:
                raise AdapterFormatError(f"{key}: saved shape {tuple(value.shape)}, expected {tuple(param.shape)}.")
            param.data.copy_(value.to(param.dtype))
