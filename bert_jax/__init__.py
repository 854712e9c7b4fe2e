"""bert_jax: BERT and ALBERT encoders in JAX/Flax NNX, pretraining and fine-tuning."""

import glob
import importlib.util
import os


def _skip_absent_tpu() -> None:
    """On a host with no accelerator, keep JAX from loading libtpu's TPU backend.

    libtpu (the TPU extra, which also compiles for TPU targets from any host) makes JAX try
    a TPU backend at start-up whatever the host; where no TPU, GPU or other accelerator
    device exists that try only fails, with lines of warnings, before JAX falls back to the
    CPU. Compiling for a named topology loads libtpu by itself and is unaffected.
    """
    if "JAX_PLATFORMS" in os.environ or "JAX_FORCE_TPU_INIT" in os.environ:
        return
    if importlib.util.find_spec("libtpu") is None:
        return
    accelerators = ("/dev/accel*", "/dev/vfio/[0-9]*", "/dev/nvidia[0-9]*", "/dev/kfd", "/dev/dxg")
    if any(glob.glob(pattern) for pattern in accelerators):
        return
    for vendor in glob.glob("/sys/bus/pci/devices/*/vendor"):
        try:
            with open(vendor) as f:
                if f.read().strip() == "0x1ae0":  # Google: a TPU chip
                    return
        except OSError:
            continue
    os.environ["JAX_PLATFORMS"] = "cpu"


_skip_absent_tpu()
