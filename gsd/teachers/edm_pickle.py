"""Import NVlabs EDM checkpoints (``network-snapshot-*.pkl``) without running code from them.

An EDM snapshot is a pickled dict whose ``'ema'`` entry is a ``training.networks.EDMPrecond``
around a ``SongUNet`` (DDPM++ or NCSN++) or a ``DhariwalUNet`` (ADM). Those classes are
wrapped by EDM's ``torch_utils.persistence``: each instance pickles as a call
``_reconstruct_persistent_obj(meta)`` where ``meta`` carries the *source code* of the
defining module, the class name and the instance's ``__dict__`` (which holds the constructor
arguments as ``_init_args`` / ``_init_kwargs`` and the ``_parameters`` / ``_buffers`` /
``_modules`` of the torch module). Unpickling it the ordinary way imports and executes
that source, i.e. arbitrary code.

Here the pickle is read by `_RestrictedUnpickler`, whose ``find_class`` maps a short
allow-list of globals onto inert stand-ins and refuses everything else, naming the class:

- ``torch_utils.persistence._reconstruct_persistent_obj`` -> `PersistentRecord` (class name
  and state only; the module source is never looked at beyond its type, never executed);
- ``torch.nn.modules.container.ModuleDict`` / ``ModuleList`` / ``Sequential``,
  ``torch.nn.modules.module.Module``, ``dnnlib.util.EasyDict`` -> `ObjectRecord` stand-ins;
- tensors: ``torch._utils._rebuild_tensor_v2`` / ``_rebuild_tensor`` / ``_rebuild_parameter``
  / ``_rebuild_parameter_with_state``, storages: ``torch.storage._load_from_bytes`` (its
  payload is a legacy ``torch.save`` stream, read with ``torch.load(weights_only=True)``);
- ``collections.OrderedDict``, ``builtins.set`` / ``frozenset``, ``torch.<dtype>``,
  ``numpy.dtype`` and ``numpy(._)core.multiarray.scalar`` for numeric dtypes (EDM stores
  ``np.sqrt(0.5)`` and the like among constructor arguments), ``copyreg._reconstructor``
  for stand-in classes only, ``_codecs.encode(str, 'latin1')`` (bytes in protocol 2).
  Every one is a function of this module (or an inert type); ``module_src`` is never read.

The records are then mapped onto the project's classes:

- ``SongUNet`` with ``embedding_type='positional'``, ``encoder_type='standard'``,
  ``decoder_type='standard'`` (DDPM++) -> `gsd.models.networks.SongUNet` (same parameter names:
  the key mapping is the identity, checked tensor by tensor);
- ``SongUNet`` with ``embedding_type='fourier'`` and ``encoder_type`` 'residual' or 'skip'
  (NCSN++; decoder 'standard') -> `NCSNppUNet` below;
- ``DhariwalUNet`` (ADM) -> `DhariwalUNet` below;
- the preconditioner must be ``EDMPrecond`` (VP/VE/iDDPM preconditioners are refused).

Everything is gated: `load_edm_pickle(path)` raises `UsageError` unless
``trust_pickle=True``, and even then only the allow-listed classes are materialised.
"""

from __future__ import annotations

import collections
import hashlib
import io
import os
import pickle
import warnings
from typing import Any

import torch
from torch import nn

from gsd.errors import PickleRefused, UsageError
from gsd.util import one_line as _one_line
from gsd.models.networks import DhariwalUNet, EDMPrecond, FourierEmbedding, NCSNppUNet, SongUNet, UNetBlock, check_int, check_sigma_data
from gsd.models.checkpoint import build_on_meta, min_tensor_count, note_float32_cast, save_denoiser, to_float32_state

__all__ = ["PickleRefused", "PersistentRecord", "ObjectRecord", "restricted_load", "load_edm_pickle",
           "records_to_denoiser", "export_edm_pickle", "NCSNppUNet", "DhariwalUNet", "FourierEmbedding",
           "SUPPORTED_ARCHITECTURES"]

SUPPORTED_ARCHITECTURES = ("SongUNet DDPM++ (positional embedding, standard encoder/decoder)",
                           "SongUNet NCSN++ (Fourier embedding, residual or skip encoder, standard decoder)",
                           "DhariwalUNet (ADM)")


# ----------------------------------------------------------------------------------------
# Inert stand-ins.

class _Frozen(type):
    """Metaclass of the stand-in classes a pickle can name: their attributes cannot be set
    (a BUILD opcode with slot state would otherwise setattr on the class)."""

    def __setattr__(cls, name, value):
        raise PickleRefused(f"the pickle tried to set {name!r} on {cls.__name__}")


class PersistentRecord:
    """What ``_reconstruct_persistent_obj(meta)`` produced: the class name and the state."""

    def __init__(self, class_name: str, state: dict):
        self.class_name = class_name
        self.state = state

    def __repr__(self):
        return f"<PersistentRecord {self.class_name}>"


class ObjectRecord(metaclass=_Frozen):
    """Base of the stand-ins for allow-listed non-persistent classes (e.g. ModuleDict)."""

    class_path = "?"

    def __setstate__(self, state):  # BUILD opcode
        self.state = state

    def __repr__(self):
        return f"<ObjectRecord {self.class_path}>"


class _EasyDictRecord(dict, metaclass=_Frozen):
    class_path = "dnnlib.util.EasyDict"

    def __setstate__(self, state):
        if state:
            self.update(dict(state))


_RECORD_CLASSES: dict[str, type] = {}


def _record_class(path: str) -> type:
    if path not in _RECORD_CLASSES:
        _RECORD_CLASSES[path] = type(f"Record[{path}]", (ObjectRecord,), {"class_path": path})
    return _RECORD_CLASSES[path]


_MODULE_CONTAINERS = ("torch.nn.modules.container.ModuleDict", "torch.nn.modules.container.ModuleList",
                      "torch.nn.modules.container.Sequential", "torch.nn.modules.module.Module")


# ----------------------------------------------------------------------------------------
# Safe replacements of the callables a pickle may invoke.

def _reconstruct_persistent_obj(meta):
    if not isinstance(meta, dict):
        raise PickleRefused(f"persistent object with a {type(meta).__name__} instead of a meta dict")
    if meta.get("type") != "class":
        raise PickleRefused(f"persistent object of type {meta.get('type')!r} (only 'class' is supported)")
    name = meta.get("class_name")
    if not isinstance(name, str) or not name.isidentifier():
        raise PickleRefused(f"persistent object with an invalid class name {name!r}")
    state = meta.get("state")
    if state is None:
        state = {}
    if not isinstance(state, dict):
        raise PickleRefused(f"persistent {name} has a {type(state).__name__} state, expected a dict")
    # meta['module_src'] (the defining module's source code) is deliberately ignored.
    return PersistentRecord(name, dict(state))


def _load_from_bytes(data):
    if not isinstance(data, (bytes, bytearray)):
        raise PickleRefused("storage payload is not bytes")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            storage = torch.load(io.BytesIO(bytes(data)), weights_only=True, map_location="cpu")
        except Exception as exc:  # noqa: BLE001 - report any failure as one line
            raise PickleRefused(f"a tensor storage could not be read safely ({_one_line(exc)})") from None
    if not isinstance(storage, (torch.storage.TypedStorage, torch.UntypedStorage)):
        raise PickleRefused(f"storage payload decoded to {type(storage).__name__}, expected a storage")
    return storage


def _check_hooks(hooks):
    if hooks:
        raise PickleRefused("a tensor carries backward hooks (not allowed)")


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                       metadata=None):
    _check_hooks(backward_hooks)
    return _rebuild_tensor(storage, storage_offset, size, stride)


def _rebuild_tensor(storage, storage_offset, size, stride):
    if isinstance(storage, torch.storage.TypedStorage):
        dtype, untyped = storage.dtype, storage._untyped_storage
    elif isinstance(storage, torch.UntypedStorage):
        dtype, untyped = torch.uint8, storage
    else:
        raise PickleRefused(f"tensor built on a {type(storage).__name__}, expected a storage")
    try:
        t = torch.empty((0,), dtype=dtype)
        t.set_(untyped, int(storage_offset), tuple(int(s) for s in size), tuple(int(s) for s in stride))
    except Exception as exc:  # noqa: BLE001
        raise PickleRefused(f"malformed tensor in the pickle ({_one_line(exc)})") from None
    return t


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None):
    _check_hooks(backward_hooks)
    if not torch.is_tensor(data):
        raise PickleRefused("parameter without tensor data")
    return data


def _rebuild_parameter_with_state(data, requires_grad, backward_hooks, state):
    return _rebuild_parameter(data, requires_grad, backward_hooks)


def _rebuild_from_type_v2(func, new_type, args, state):
    func = getattr(func, "fn", None)
    if func not in (_rebuild_tensor_v2, _rebuild_tensor, _rebuild_parameter):
        raise PickleRefused("tensor subclass rebuilt by a non-allow-listed function")
    return func(*args)


class _NumpyDType(metaclass=_Frozen):
    """Stand-in for ``numpy.dtype(spec, align, copy)`` + BUILD: keeps the spec and byte order only."""

    __slots__ = ("spec", "byteorder")

    def __init__(self, spec: str):
        object.__setattr__(self, "spec", spec)
        object.__setattr__(self, "byteorder", "=")

    def __setstate__(self, state):
        if isinstance(state, tuple) and len(state) > 1 and state[1] in ("<", ">", "=", "|"):
            object.__setattr__(self, "byteorder", state[1])

    def resolve(self):
        import numpy as np

        try:
            dt = np.dtype(self.spec)
        except TypeError:
            raise PickleRefused(f"numpy dtype {self.spec!r}") from None
        if dt.kind not in "biufc":
            raise PickleRefused(f"numpy dtype {dt} (only numeric dtypes are allowed)")
        return dt.newbyteorder(self.byteorder) if self.byteorder in "<>" else dt


def _numpy_dtype(*args):
    if not args or not isinstance(args[0], str):
        raise PickleRefused("numpy.dtype with a non-string spec")
    record = _NumpyDType(args[0])
    record.resolve()  # refuse non-numeric dtypes at once
    return record


def _numpy_scalar(dtype, data=None):
    import numpy as np

    if not isinstance(dtype, _NumpyDType):
        raise PickleRefused(f"numpy scalar of dtype {type(dtype).__name__}")
    dt = dtype.resolve()
    if not isinstance(data, (bytes, bytearray)) or len(data) != dt.itemsize:
        raise PickleRefused("malformed numpy scalar")
    return np.frombuffer(bytes(data), dtype=dt, count=1)[0].item()


class _SafeCallable(metaclass=_Frozen):
    """An allow-listed function as handed to the unpickler: callable, but BUILD cannot touch it."""

    __slots__ = ("fn",)

    def __init__(self, fn):
        object.__setattr__(self, "fn", fn)

    def __call__(self, *args, **kwargs):
        return self.fn(*args, **kwargs)

    def __setstate__(self, state):
        raise PickleRefused(f"the pickle tried to modify {self.fn.__name__}")

    def __setattr__(self, name, value):
        raise PickleRefused(f"the pickle tried to modify {self.fn.__name__}")


def _codecs_encode(text, encoding="utf-8"):
    # Protocol-2 pickles store bytes as _codecs.encode(str, 'latin1').
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise PickleRefused("_codecs.encode other than (str, 'latin1')")
    return text.encode("latin1")


def _copyreg_reconstructor(cls, base, state):
    if not (isinstance(cls, type) and issubclass(cls, (ObjectRecord, _EasyDictRecord))) or base is not object:
        raise PickleRefused(f"copyreg._reconstructor of {getattr(cls, '__name__', cls)!r}")
    return cls.__new__(cls)


_TENSOR_TYPE = ("tensor type",)  # inert, not callable: only an argument of _rebuild_from_type_v2

_SAFE_GLOBALS: dict[str, Any] = {
    "torch_utils.persistence._reconstruct_persistent_obj": _reconstruct_persistent_obj,
    "torch.storage._load_from_bytes": _load_from_bytes,
    "torch._utils._rebuild_tensor_v2": _rebuild_tensor_v2,
    "torch._utils._rebuild_tensor": _rebuild_tensor,
    "torch._utils._rebuild_parameter": _rebuild_parameter,
    "torch._utils._rebuild_parameter_with_state": _rebuild_parameter_with_state,
    "torch._tensor._rebuild_from_type_v2": _rebuild_from_type_v2,
    "torch.Tensor": _TENSOR_TYPE,
    "torch.nn.parameter.Parameter": _TENSOR_TYPE,
    "collections.OrderedDict": collections.OrderedDict,
    "builtins.set": set,
    "builtins.frozenset": frozenset,
    "builtins.object": object,
    "copyreg._reconstructor": _copyreg_reconstructor,
    "_codecs.encode": _codecs_encode,
    "numpy.dtype": _numpy_dtype,
    "numpy.core.multiarray.scalar": _numpy_scalar,
    "numpy._core.multiarray.scalar": _numpy_scalar,
    "dnnlib.util.EasyDict": _EasyDictRecord,
}


_SAFE_GLOBALS = {key: (_SafeCallable(value) if callable(value) and not isinstance(value, type) else value)
                 for key, value in _SAFE_GLOBALS.items()}


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, fh, source: str):
        super().__init__(fh)
        self._source = source

    def find_class(self, module: str, name: str):
        path = f"{module}.{name}"
        if path in _SAFE_GLOBALS:
            return _SAFE_GLOBALS[path]
        if path in _MODULE_CONTAINERS:
            return _record_class(path)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise PickleRefused(f"{self._source}: refusing to load {path}: it is not one of the allow-listed "
                            f"classes of an EDM checkpoint (nothing from the pickle was executed)")

    def persistent_load(self, pid):
        raise PickleRefused(f"{self._source}: the pickle uses persistent ids, which EDM checkpoints do not")


def restricted_load(fh, source: str = "pickle") -> Any:
    """Unpickle `fh` with the allow-list above; PickleRefused (a UsageError) on anything else."""
    try:
        return _RestrictedUnpickler(fh, source).load()
    except UsageError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, KeyError, IndexError,
            MemoryError) as exc:
        raise UsageError(f"{source} is not a readable EDM pickle ({type(exc).__name__}: {_one_line(exc)})") \
            from None


# ----------------------------------------------------------------------------------------
# Records -> our networks.

_EDM_PRECOND_PARAMS = ["img_resolution", "img_channels", "label_dim", "use_fp16", "sigma_min", "sigma_max",
                       "sigma_data", "model_type"]
_SONG_PARAMS = ["img_resolution", "in_channels", "out_channels", "label_dim", "augment_dim", "model_channels",
                "channel_mult", "channel_mult_emb", "num_blocks", "attn_resolutions", "dropout", "label_dropout",
                "embedding_type", "channel_mult_noise", "encoder_type", "decoder_type", "resample_filter"]
_SONG_DEFAULTS = dict(label_dim=0, augment_dim=0, model_channels=128, channel_mult=[1, 2, 2, 2], channel_mult_emb=4,
                      num_blocks=4, attn_resolutions=[16], dropout=0.10, label_dropout=0.0,
                      embedding_type="positional", channel_mult_noise=1, encoder_type="standard",
                      decoder_type="standard", resample_filter=[1, 1])
_DHARIWAL_PARAMS = ["img_resolution", "in_channels", "out_channels", "label_dim", "augment_dim", "model_channels",
                    "channel_mult", "channel_mult_emb", "num_blocks", "attn_resolutions", "dropout",
                    "label_dropout"]
_DHARIWAL_DEFAULTS = dict(label_dim=0, augment_dim=0, model_channels=192, channel_mult=[1, 2, 3, 4],
                          channel_mult_emb=4, num_blocks=3, attn_resolutions=[32, 16, 8], dropout=0.10,
                          label_dropout=0.0)
# Classes allowed inside the network tree (persistent classes of training.networks, plus torch containers).
_TREE_CLASSES = {"EDMPrecond", "SongUNet", "DhariwalUNet", "UNetBlock", "Conv2d", "Linear", "GroupNorm",
                 "PositionalEmbedding", "FourierEmbedding"}


def _class_of(rec) -> str:
    if isinstance(rec, PersistentRecord):
        return rec.class_name
    if isinstance(rec, ObjectRecord):
        return rec.class_path
    return type(rec).__name__


def _state_of(rec) -> dict:
    state = getattr(rec, "state", None)
    if isinstance(state, tuple) and len(state) == 2 and isinstance(state[0], dict):  # (dict, slotstate)
        state = state[0]
    return state if isinstance(state, dict) else {}


def _init_kwargs(rec: PersistentRecord, params: list[str], what: str) -> dict:
    state = rec.state
    args = state.get("_init_args") or ()
    kwargs = state.get("_init_kwargs")
    if kwargs is None and not args:
        raise UsageError(f"{what}: the {rec.class_name} record has no constructor arguments (_init_kwargs); "
                         f"is this a torch_utils.persistence pickle from EDM?")
    kwargs = dict(kwargs or {})
    if len(args) > len(params):
        raise UsageError(f"{what}: {rec.class_name} got {len(args)} positional constructor arguments")
    for name, value in zip(params, args):
        if name in kwargs:
            raise UsageError(f"{what}: {rec.class_name} argument {name} given twice")
        kwargs[name] = value
    return kwargs


def _walk_tensors(rec, prefix: str, out: dict, classes: dict, what: str) -> None:
    cls = _class_of(rec)
    short = cls.rsplit(".", 1)[-1]
    if not ((isinstance(rec, PersistentRecord) and short in _TREE_CLASSES)
            or (isinstance(rec, ObjectRecord) and cls in _MODULE_CONTAINERS)):
        where = prefix.rstrip(".") or "<root>"
        raise UsageError(f"{what}: unsupported class {cls} at {where} (supported: "
                         f"{', '.join(sorted(_TREE_CLASSES))}, torch.nn.ModuleDict)")
    classes[prefix.rstrip(".")] = short
    state = _state_of(rec)
    for group in ("_parameters", "_buffers"):
        items = state.get(group) or {}
        if not isinstance(items, dict):
            raise UsageError(f"{what}: {prefix}{group} is not a dict")
        for name, value in items.items():
            if value is None:
                continue
            if not torch.is_tensor(value):
                raise UsageError(f"{what}: {prefix}{name} is a {type(value).__name__}, expected a tensor")
            out[prefix + str(name)] = value
    modules = state.get("_modules") or {}
    if not isinstance(modules, dict):
        raise UsageError(f"{what}: {prefix}_modules is not a dict")
    for name, child in modules.items():
        if child is not None:
            _walk_tensors(child, f"{prefix}{name}.", out, classes, what)


def _build_model(model_rec: PersistentRecord, precond_kwargs: dict, what: str,
                 n_tensors: int | None = None) -> tuple[nn.Module, str]:
    """The network the record's constructor arguments describe. With `n_tensors` (how many
    tensors the pickle holds), first refuse arguments that ask for more blocks than that
    (a cheap count, before anything is built)."""
    name = model_rec.class_name
    if name == "SongUNet":
        params, defaults = _SONG_PARAMS, _SONG_DEFAULTS
    elif name == "DhariwalUNet":
        params, defaults = _DHARIWAL_PARAMS, _DHARIWAL_DEFAULTS
    else:
        raise UsageError(f"{what}: unsupported network class {name} (supported: SongUNet, DhariwalUNet)")
    kwargs = _init_kwargs(model_rec, params, what)
    unknown = sorted(set(kwargs) - set(params))
    if unknown:
        raise UsageError(f"{what}: {name} has constructor arguments this importer does not know: "
                         f"{', '.join(unknown)}")
    full = {**defaults, **kwargs}
    for key in ("img_resolution", "in_channels", "out_channels"):
        if key not in full:
            raise UsageError(f"{what}: {name} lacks the constructor argument {key}")
    try:
        if name == "DhariwalUNet":
            cls, variant = DhariwalUNet, "adm"
        elif (full["embedding_type"], full["encoder_type"], full["decoder_type"]) == ("positional", "standard",
                                                                                       "standard"):
            cls, variant = SongUNet, "ddpmpp"
        else:
            cls, variant = NCSNppUNet, ("ncsnpp" if full["embedding_type"] == "fourier" else "songunet")
        if n_tensors is not None:
            bound = min_tensor_count(cls.__name__, full)
            if bound > n_tensors:
                raise UsageError(f"{what}: the {name} constructor arguments ask for at least {bound} tensors, "
                                 f"the pickle holds {n_tensors}")
        return cls(**full), variant
    except (ValueError, TypeError, OverflowError) as exc:
        raise UsageError(f"{what}: unsupported {name} configuration ({_one_line(exc)})") from None


def records_to_denoiser(ema, what: str = "EDM pickle") -> tuple[EDMPrecond, dict]:
    """Map the record tree of EDM's ``EDMPrecond`` onto a loaded `gsd.models.networks.EDMPrecond`.

    Returns (network in eval mode, info dict). UsageError (one line) on any mismatch.
    """
    if not isinstance(ema, PersistentRecord):
        raise UsageError(f"{what}: 'ema' is a {type(ema).__name__}, expected a persistent EDM network")
    if ema.class_name != "EDMPrecond":
        hint = (" (VP/VE/iDDPM-preconditioned baselines are not supported: only EDMPrecond)"
                if ema.class_name in ("VPPrecond", "VEPrecond", "iDDPMPrecond") else "")
        raise UsageError(f"{what}: unsupported preconditioner {ema.class_name}{hint}")
    pkw = _init_kwargs(ema, _EDM_PRECOND_PARAMS, what)
    model_rec = (ema.state.get("_modules") or {}).get("model")
    if not isinstance(model_rec, PersistentRecord):
        raise UsageError(f"{what}: EDMPrecond has no persistent 'model' sub-network")
    try:
        sigma_data = check_sigma_data(ema.state.get("sigma_data", pkw.get("sigma_data", 0.5)))
        label_dim = check_int("label_dim", ema.state.get("label_dim", pkw.get("label_dim", 0)), 0)
    except ValueError as exc:
        raise UsageError(f"{what}: EDMPrecond {_one_line(exc)}") from None
    found: dict[str, torch.Tensor] = {}
    classes: dict[str, str] = {}
    try:
        _walk_tensors(ema, "", found, classes, what)
    except RecursionError:
        raise UsageError(f"{what}: the network tree is nested too deeply for an EDM network") from None
    # Built on the meta device first: the constructor arguments come from the file, and only
    # once the names and shapes match the tensors the pickle really holds is memory allocated.
    model, variant = build_on_meta(lambda: _build_model(model_rec, pkw, what, n_tensors=len(found)))
    if int(getattr(model, "label_dim", label_dim)) != label_dim:
        raise UsageError(f"{what}: EDMPrecond label_dim {label_dim} differs from its network's "
                         f"{getattr(model, 'label_dim', None)}")
    net = EDMPrecond(model, sigma_data=sigma_data, label_dim=label_dim)
    # Key mapping EDM -> gsd: EDM's names are ours (the architectures mirror EDM's module layout),
    # so the mapping is the identity; it is verified below, key by key and shape by shape.
    mapped = {key: value for key, value in found.items()}
    expected = net.state_dict()
    missing = sorted(set(expected) - set(mapped))
    unexpected = sorted(set(mapped) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} tensors missing (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected tensors (e.g. {unexpected[0]})")
        raise UsageError(f"{what}: the network's tensors do not match its {model_rec.class_name} "
                         f"constructor arguments: {'; '.join(parts)}")
    for key, ref in expected.items():
        value = mapped[key]
        if tuple(value.shape) != tuple(ref.shape):
            raise UsageError(f"{what}: tensor {key} has shape {tuple(value.shape)}, expected {tuple(ref.shape)} "
                             f"from the {model_rec.class_name} constructor arguments")
        if not value.is_floating_point():
            raise UsageError(f"{what}: tensor {key} has dtype {value.dtype}, expected floating point")
    # float32 whatever the pickle stores; finiteness is checked after the cast (1e300 -> inf)
    state, others = to_float32_state(mapped, what)
    note_float32_cast(others, what)
    net = net.to_empty(device="cpu")
    with torch.no_grad():
        net.load_state_dict({k: v.clone() for k, v in state.items()}, strict=True)
    # Per-block attention heads are not in the state dict's shapes: check them against the records.
    for name, module in net.named_modules():
        if isinstance(module, UNetBlock):
            rec_heads = _find_record(ema, name).state.get("num_heads")
            if rec_heads is not None and int(rec_heads) != module.num_heads:
                raise UsageError(f"{what}: block {name} has {rec_heads} attention heads in the pickle, "
                                 f"the rebuilt network {module.num_heads}")
    info = dict(edm_class=model_rec.class_name, variant=variant, sigma_data=sigma_data, label_dim=label_dim,
                sigma_min=_float_or_none(ema.state.get("sigma_min", pkw.get("sigma_min"))),
                sigma_max=_float_or_none(ema.state.get("sigma_max", pkw.get("sigma_max"))),
                use_fp16=bool(ema.state.get("use_fp16", pkw.get("use_fp16", False))),
                model_config=dict(model.config))
    return net.eval(), info


def _find_record(root, dotted: str):
    rec = root
    for part in dotted.split("."):
        rec = (_state_of(rec).get("_modules") or {})[part]
    return rec


def _float_or_none(value):
    try:
        return None if value is None else float(value)
    except (TypeError, ValueError):
        return None


# ----------------------------------------------------------------------------------------
# Entry points.

TRUST_HINT = ("loading a pickle is gated because pickles can run code: pass --trust-pickle "
              "(trust_pickle=True) if you trust where the file comes from; even then only EDM's "
              "allow-listed classes are read and no code from the file is executed")


def load_edm_pickle(path, *, trust_pickle: bool = False, key: str = "ema") -> EDMPrecond:
    """Load the `key` ('ema') network of an EDM ``network-snapshot-*.pkl`` as a gsd `EDMPrecond`.

    Raises UsageError unless ``trust_pickle=True``. The returned network is in eval mode on
    the CPU and has ``.import_info`` (architecture, sigma range, source sha256).
    """
    path = os.fspath(path)
    if not trust_pickle:
        raise UsageError(f"{path}: {TRUST_HINT}")
    if not os.path.isfile(path):
        raise UsageError(f"EDM pickle {path} does not exist" if not os.path.exists(path)
                         else f"EDM pickle {path} is not a file")
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            digest.update(chunk)
    with open(path, "rb") as fh:
        data = restricted_load(fh, source=path)
    if isinstance(data, dict):
        if key not in data:
            raise UsageError(f"{path}: no {key!r} entry in the pickled dict (keys: "
                             f"{', '.join(map(str, data)) or 'none'})")
        ema = data[key]
    else:
        ema = data
    net, info = records_to_denoiser(ema, what=path)
    info.update(source_file=os.path.basename(path), source_sha256=digest.hexdigest())
    net.import_info = info
    return net


def export_edm_pickle(path, out, *, trust_pickle: bool = False) -> tuple[EDMPrecond, dict]:
    """`load_edm_pickle` then `save_denoiser(out)`; returns (network, metadata written)."""
    net = load_edm_pickle(path, trust_pickle=trust_pickle)
    info = dict(net.import_info)
    meta = {"kind": "teacher", "source": "edm-pickle", "sample_shape": list(net.sample_shape), **info}
    meta.pop("model_config", None)
    try:
        save_denoiser(out, net, extra_metadata=meta)
    except OSError as exc:
        raise UsageError(f"cannot write {out} ({exc.strerror or _one_line(exc)})") from None
    return net, meta
