"""fwpzoo import / export: a Hugging Face folder <-> a fwpzoo workdir, checked before anything
is written (every refusal is an InteropError or ConfigError of one line, and leaves no file).

An imported workdir holds, besides a normal run (config.json, checkpoints/ at step 0), `hf/`: the
source's config.json (the text model's, for a container like qwen3_5), its tokenizer files and
`interop.json` (the architecture and each tensor's dtype), which export reads to write the
folder back in the source's own names and dtypes.
"""

import json
import shutil
from pathlib import Path

import jax
import numpy as np

from fwpzoo.config import Config, ConfigError, from_dict, to_dict
from fwpzoo.interop.architectures import ARCHITECTURES, Rule, resolve
from fwpzoo.interop.safetensors import (
    DTYPES,
    NAMES,
    SINGLE,
    InteropError,
    read_folder,
    write_file,
)

HF_DIR = "hf"
MANIFEST = "interop.json"
TOKENIZER = "tokenizer.json"
COMPUTE_DTYPES = ("float32", "bfloat16")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".msgpack", ".h5")
FLOATS = ("F32", "BF16", "F16", "F64")


def read_config(src: Path) -> dict:
    path = src / "config.json"
    if not src.is_dir():
        raise InteropError(f"{src} is not a folder")
    if not path.is_file():
        raise InteropError(f"{src} has no config.json")
    try:
        raw = json.loads(path.read_text())
    except ValueError as error:
        raise InteropError(f"{path} is not JSON: {error}") from None
    if not isinstance(raw, dict):
        raise InteropError(f"{path} is not a JSON object")
    return raw


def expected_shapes(rules: list[Rule], params: dict, found: dict) -> dict[str, tuple[int, ...]]:
    """{checkpoint tensor: shape} implied by the fwpzoo parameter shapes `params` {path: shape}:
    a linear piece is [rows, in], a conv piece [rows, 1, W]; a tensor split into several row
    pieces has all their rows. Whole tensors stacked into one kernel may split its rows in any
    way (transformers saves OLMo Hybrid's q, k, v convolutions in equal thirds): their row
    counts are the `found` shapes {name: shape}, which must add up to the kernel's."""
    shapes, rows = {}, {}
    for rule in rules:
        shape = tuple(params[rule.target])
        if rule.kind == "copy":
            shapes[rule.pieces[0].name] = shape
            continue
        if rule.kind == "experts":  # [E, in, out] <- E tensors [out, in]
            shapes |= {piece.name: (shape[2], shape[1]) for piece in rule.pieces}
            continue
        tail = (shape[0],) if rule.kind == "linear" else (1, shape[0])  # in, or 1 and W
        stacked = len(rule.pieces) > 1 and all(p.rows is None for p in rule.pieces)
        if stacked:
            counts = [found.get(p.name, (0,))[0] for p in rule.pieces]
            if sum(counts) != shape[1]:
                names = ", ".join(p.name for p in rule.pieces)
                raise InteropError(
                    f"tensors {names} have {' + '.join(map(str, counts))} rows; config.json "
                    f"implies {shape[1]} in all"
                )
        for i, piece in enumerate(rule.pieces):
            count = counts[i] if stacked else shape[1] if piece.rows is None else len(piece.rows)
            rows.setdefault(piece.name, [0, tail])[0] += count
    return shapes | {name: (count, *tail) for name, (count, tail) in rows.items()}


def piece_rows(piece, tensor):
    """The rows of `tensor` [rows, ...] that `piece` takes, conv weights [C, 1, W] as [C, W]."""
    tensor = tensor[:, 0, :] if tensor.ndim == 3 else tensor
    return tensor if piece.rows is None else tensor[list(piece.rows)]


def to_params(rules: list[Rule], tensors: dict[str, np.ndarray]) -> dict:
    """{fwpzoo path: float32 array} from the checkpoint tensors: a copy as is, a kernel as the
    transpose of its pieces' rows stacked ([in, out] from [out, in]; [W, C] from [C, W])."""
    params = {}
    for rule in rules:
        if rule.kind == "copy":
            params[rule.target] = tensors[rule.pieces[0].name].astype(np.float32)
            continue
        if rule.kind == "experts":
            weights = [tensors[p.name].astype(np.float32).T for p in rule.pieces]
            params[rule.target] = np.ascontiguousarray(np.stack(weights))
            continue
        parts = [piece_rows(p, tensors[p.name].astype(np.float32)) for p in rule.pieces]
        params[rule.target] = np.ascontiguousarray(np.concatenate(parts, axis=0).T)
    return params


def from_params(rules: list[Rule], params: dict, shapes: dict, dtypes: dict) -> dict:
    """The inverse of to_params: {checkpoint tensor: array in its source dtype}."""
    out = {}
    for rule in rules:
        value = np.asarray(params[rule.target], np.float32)
        if rule.kind == "copy":
            out[rule.pieces[0].name] = value
            continue
        if rule.kind == "experts":
            out |= {p.name: np.ascontiguousarray(value[e].T) for e, p in enumerate(rule.pieces)}
            continue
        stacked, at = value.T, 0  # [out, in] or [C, W]
        for piece in rule.pieces:
            shape = shapes[piece.name]
            tensor = out.setdefault(piece.name, np.zeros(shape, np.float32))
            view = tensor[:, 0, :] if len(shape) == 3 else tensor  # a view: writes go through
            count = shape[0] if piece.rows is None else len(piece.rows)
            view[slice(None) if piece.rows is None else list(piece.rows)] = stacked[at : at + count]
            at += count
    return {name: array.astype(DTYPES[dtypes[name]]) for name, array in out.items()}


def param_path(path) -> str:
    """A pytree path of an nnx state -> "blocks/0/mixer/qkv_proj/kernel"."""
    names = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
    return "/".join(names[:-1] if names and names[-1] == "value" else names)


def flat(tree) -> dict:
    return {param_path(path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def check_tensors(tensors: dict, shapes: dict, arch, prefix: str, tied: bool) -> None:
    """Every tensor the mapping needs is there with its shape and a float dtype; nothing else is,
    but the parts of a release that are not the causal LM (arch.IGNORED)."""
    for name, shape in shapes.items():
        if name not in tensors:
            raise InteropError(f"tensor {name!r} is missing from the checkpoint")
        if tuple(tensors[name].shape) != tuple(shape):
            raise InteropError(
                f"tensor {name!r} has shape {list(tensors[name].shape)}; config.json implies "
                f"{list(shape)}"
            )
        if NAMES[tensors[name].dtype] not in FLOATS:
            raise InteropError(f"tensor {name!r} has dtype {NAMES[tensors[name].dtype]}")
    ignored = tuple(
        p.replace("model.", prefix, 1) if p.startswith("model.") else p for p in arch.IGNORED
    )
    for name in sorted(set(tensors) - set(shapes)):
        if name.startswith(ignored) or (tied and name == "lm_head.weight"):
            continue
        raise InteropError(f"tensor {name!r} is not part of a {arch.model_type} model")


def import_config(model: dict, tokenizer: Path, dtype: str, overrides) -> Config:
    """The run's config: the mapped model section, the text task on the model's tokenizer,
    then the overrides (any section but model: the model is the source's)."""
    from fwpzoo.config_file import apply_overrides

    if dtype not in COMPUTE_DTYPES:
        raise ConfigError(f"--dtype must be one of {', '.join(COMPUTE_DTYPES)}, got {dtype!r}")
    for override in overrides:
        if override.strip().startswith("model."):
            raise ConfigError(f"override {override!r}: the model section comes from the source")
    data = {
        "model": model,
        "data": {"task": "text", "tokenizer": str(tokenizer), "seq_len": 128},
        "train": {"compute_dtype": dtype},
    }
    data = apply_overrides(data, overrides)
    return from_dict(Config, data)


def resolve_model(src: Path):
    """(arch, its config, the model section) of the folder's config.json."""
    arch, hf, _ = resolve(read_config(src))
    return arch, hf, arch.model_section(hf)


def empty_target(path: Path, flag: str) -> None:
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise ConfigError(f"{flag} {path} exists and is not an empty folder")


def read_checkpoint(src, targets_of) -> tuple:
    """(arch, its config, model section, {fwpzoo path: float32 array}, manifest) of the folder
    `src`, every tensor checked; `targets_of(model section)` gives {path: shape} of the
    fwpzoo parameters. Writes nothing."""
    src = Path(src)
    arch, hf, prefix = resolve(read_config(src))
    model = arch.model_section(hf)
    tensors = read_folder(src)
    for candidate in (prefix, *arch.PREFIXES):  # a text model saved inside a container
        if f"{candidate}embed_tokens.weight" in tensors:
            prefix = candidate
            break
    targets = targets_of(model)
    rules = arch.rules(hf, prefix)
    if {rule.target for rule in rules} != set(targets):
        missing = sorted(set(targets) ^ {rule.target for rule in rules})
        raise InteropError(f"the {arch.model_type} mapping does not match parameter {missing[0]}")
    shapes = expected_shapes(rules, targets, {name: t.shape for name, t in tensors.items()})
    check_tensors(tensors, shapes, arch, prefix, model["tie_embeddings"])
    manifest = {
        "architecture": arch.model_type,
        "source": str(src.resolve()),
        "dtypes": {to_text_name(name, prefix): NAMES[tensors[name].dtype] for name in shapes},
        "shapes": {to_text_name(name, prefix): list(shape) for name, shape in shapes.items()},
    }
    return arch, hf, model, to_params(rules, tensors), manifest


def model_targets(model: dict) -> dict:
    """{fwpzoo path: shape} of the parameters of a model section, built as shapes only."""
    from flax import nnx

    from fwpzoo.models import build_model
    from fwpzoo.models.config import ModelConfig

    cfg = from_dict(ModelConfig, model, "model.")
    built = nnx.eval_shape(lambda: build_model(cfg, vocab_size=cfg.vocab_size, rngs=nnx.Rngs(0)))
    return {path: tuple(x.shape) for path, x in flat(nnx.state(built, nnx.Param)).items()}


def load_model(src, dtype=None):
    """(the fwpzoo CausalLM of the folder `src` with its converted weights, its ModelConfig),
    without a workdir: for studying a checkpoint in Python."""
    import jax.numpy as jnp
    from flax import nnx

    from fwpzoo.models import build_model
    from fwpzoo.models.config import ModelConfig

    _, hf, model, params, _ = read_checkpoint(src, model_targets)
    cfg = from_dict(ModelConfig, model, "model.")
    compute = jnp.dtype(dtype or "float32")
    built = nnx.eval_shape(
        lambda: build_model(cfg, vocab_size=hf["vocab_size"], rngs=nnx.Rngs(0), dtype=compute)
    )
    graphdef, state, rest = nnx.split(built, nnx.Param, ...)
    state = jax.tree_util.tree_map_with_path(
        lambda path, _: jnp.asarray(params[param_path(path)]), state
    )
    return nnx.merge(graphdef, state, rest), cfg


def import_folder(src, workdir, dtype: str = "float32", overrides=()) -> dict:
    """Converts the Hugging Face folder `src` into a new workdir; returns a summary."""
    from fwpzoo.data.tokenizer import load_tokenizer, vocab_size
    from fwpzoo.train.loop import prepare
    from fwpzoo.train.state import abstract_model

    src, workdir = Path(src), Path(workdir)
    arch, hf, model = resolve_model(src)
    empty_target(workdir, "--workdir")
    if not (src / TOKENIZER).is_file():
        raise InteropError(f"{src} has no {TOKENIZER}")
    tokens = vocab_size(load_tokenizer(str(src / TOKENIZER)))
    if tokens > hf["vocab_size"]:
        raise InteropError(
            f"{TOKENIZER} has {tokens} tokens, more than the model's vocab_size {hf['vocab_size']}"
        )
    cfg = import_config(model, src.resolve() / TOKENIZER, dtype, overrides)
    run = prepare(cfg)  # every check of a training run, on the source's tokenizer
    _, abstract = abstract_model(cfg, run.task.vocab_size, run.mesh)
    targets = {path: tuple(x.shape) for path, x in flat(abstract["params"]).items()}
    arch, hf, model, params, manifest = read_checkpoint(src, lambda _: targets)
    cfg = import_config(model, workdir.resolve() / HF_DIR / TOKENIZER, dtype, overrides)
    text_config = {**hf, "model_type": arch.model_type, "architectures": [arch.architecture]}
    write_workdir(workdir, cfg, run, abstract, params, src, text_config, manifest)
    return {
        "workdir": str(workdir),
        "architecture": arch.model_type,
        "layers": len(model["mixers"]),
        "parameters": int(sum(np.prod(x.shape) for x in params.values())),
        "vocab_size": hf["vocab_size"],
        "tokenizer_tokens": tokens,
    }


def to_text_name(name: str, prefix: str) -> str:
    """A tensor's name in the text model's own layout (what export writes)."""
    return "model." + name[len(prefix) :] if name.startswith(prefix) else name


def write_workdir(workdir, cfg, run, abstract, params, src, text_config, manifest) -> None:
    """The workdir, built beside it and renamed into place, so a failure leaves nothing."""
    from fwpzoo.train.checkpoint import Checkpoints
    from fwpzoo.train.state import new_model, split_model
    from fwpzoo.train.workdir import CHECKPOINT_DIR, write_config

    shardings = {path: x.sharding for path, x in flat(abstract["params"]).items()}
    arrays = {path: jax.device_put(value, shardings[path]) for path, value in params.items()}
    state_params = jax.tree_util.tree_map_with_path(
        lambda path, _: arrays[param_path(path)], abstract["params"]
    )
    rest_shardings = jax.tree.map(lambda x: x.sharding, abstract["rest"])
    rest = jax.jit(
        lambda: split_model(new_model(cfg, run.task.vocab_size))[1]["rest"],
        out_shardings=rest_shardings,
    )()
    state = {"params": state_params, "rest": rest, "opt_state": run.optimizer.init(state_params)}
    meta = {"next_batch_index": 0, "config": to_dict(cfg), "reached_stop_metric": False}
    meta |= {"train_seconds": 0.0, "train_cpu_seconds": 0.0}
    partial = workdir.parent / f".{workdir.name}.importing"
    shutil.rmtree(partial, ignore_errors=True)
    try:
        (partial / HF_DIR).mkdir(parents=True)
        for path in sorted(Path(src).iterdir()):
            if (
                path.is_file()
                and path.name != "config.json"
                and not path.name.endswith((*WEIGHT_SUFFIXES, ".index.json"))
            ):
                shutil.copy2(path, partial / HF_DIR / path.name)
        (partial / HF_DIR / "config.json").write_text(json.dumps(text_config, indent=2) + "\n")
        (partial / HF_DIR / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        write_config(partial, cfg)
        checkpoints = Checkpoints(partial / CHECKPOINT_DIR, cfg.checkpoint)
        try:
            checkpoints.save(0, state, meta)
        finally:
            checkpoints.close()
        if workdir.exists():
            workdir.rmdir()  # empty, as checked
        partial.rename(workdir)
    finally:
        shutil.rmtree(partial, ignore_errors=True)


def export_folder(workdir, out, step: int | None = None) -> dict:
    """Writes the model of an imported workdir (its checkpoint `step`, default the newest) back
    as a Hugging Face folder `out`; returns a summary."""
    from fwpzoo.train.restore import restore_run
    from fwpzoo.train.sharding import to_host

    workdir, out = Path(workdir), Path(out)
    manifest_path = workdir / HF_DIR / MANIFEST
    if not manifest_path.is_file():
        raise ConfigError(
            f"{workdir} holds no {HF_DIR}/{MANIFEST}: export writes back models brought in by "
            "fwpzoo import"
        )
    empty_target(out, "--out")
    manifest = json.loads(manifest_path.read_text())
    hf = json.loads((workdir / HF_DIR / "config.json").read_text())
    arch = ARCHITECTURES[manifest["architecture"]]
    run, step, model_state = restore_run(workdir, step)
    params = {path: np.asarray(x) for path, x in flat(to_host(model_state["params"])).items()}
    rules = arch.rules(hf, "model.")
    found = {name: tuple(shape) for name, shape in manifest["shapes"].items()}
    shapes = expected_shapes(rules, {path: x.shape for path, x in params.items()}, found)
    tensors = from_params(rules, params, shapes, manifest["dtypes"])
    partial = out.parent / f".{out.name}.exporting"
    shutil.rmtree(partial, ignore_errors=True)
    try:
        partial.mkdir(parents=True)
        for path in sorted((workdir / HF_DIR).iterdir()):
            if path.is_file() and path.name != MANIFEST:
                shutil.copy2(path, partial / path.name)
        write_file(partial / SINGLE, tensors, {"format": "pt"})
        if out.exists():
            out.rmdir()
        partial.rename(out)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return {"out": str(out), "step": step, "architecture": arch.model_type, "tensors": len(tensors)}
