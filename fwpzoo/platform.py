"""Which JAX platform a command runs on, chosen before JAX is imported.

With libtpu installed (the optional `tpu` extra, for `fwpzoo plan`) on a machine without a TPU,
JAX would probe for one at its first device query and print libtpu's warnings about the missing
accelerator. Where no TPU device is present, the platform is chosen explicitly instead, so every
command's output and device choice stay what they are without libtpu.
"""

import glob
import importlib.util
import os
import sys

# where a TPU VM exposes its chips (/dev/accel* on v2-v4 and v5e, /dev/vfio/* on v5p and v6e)
TPU_DEVICE_FILES = ("/dev/accel*", "/dev/vfio/[0-9]*")


def has_tpu() -> bool:
    return any(glob.glob(pattern) for pattern in TPU_DEVICE_FILES)


def libtpu_installed() -> bool:
    return importlib.util.find_spec("libtpu") is not None


def choose_platform() -> None:
    """The CPU platform where libtpu is installed, no TPU is present and nothing chose a platform
    (a GPU plugin, when installed, keeps JAX's own choice). Called on importing fwpzoo: by the
    environment before JAX is imported, by JAX's config if it is imported and not yet started."""
    if "JAX_PLATFORMS" in os.environ or not libtpu_installed() or has_tpu():
        return
    gpu_plugins = ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin")
    if any(importlib.util.find_spec(name) is not None for name in gpu_plugins):
        return
    os.environ["JAX_PLATFORMS"] = "cpu"
    if "jax" in sys.modules:  # imported first: its config read the environment already
        import jax
        from jax._src import xla_bridge

        if not xla_bridge.backends_are_initialized() and not jax.config.jax_platforms:
            jax.config.update("jax_platforms", "cpu")


def quiet_libtpu() -> None:
    """The environment libtpu reads when it starts without a TPU VM's metadata server (compiling
    for a topology), so it does not warn that it found none."""
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    # compiling needs no chip: plans may run side by side (libtpu otherwise locks per host)
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-1")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
