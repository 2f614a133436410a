import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(2)


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory):
    """The default ColoredDigits-Bias, rendered once per session (~4 s)."""
    from fairtune.data import ColoredDigitsConfig, build_colored_digits

    out = tmp_path_factory.mktemp("colored_digits")
    build_colored_digits(ColoredDigitsConfig(), out)
    return out


@pytest.fixture(scope="session")
def judges_dir(digits_dir, tmp_path_factory):
    """Judges trained with the shipped recipe (~25 s)."""
    from fairtune.eval import train_judges

    out = tmp_path_factory.mktemp("judges")
    train_judges(digits_dir, out)
    return out


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory):
    """A tiny Stable Diffusion folder in diffusers' layout, assembled from config."""
    from fairtune.models import make_tiny_stable_diffusion

    return make_tiny_stable_diffusion(tmp_path_factory.mktemp("tiny_sd") / "sd")


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory):
    """A tiny Stable Diffusion XL folder in diffusers' layout, assembled from config."""
    from fairtune.models import make_tiny_sdxl

    return make_tiny_sdxl(tmp_path_factory.mktemp("tiny_sdxl") / "sdxl")


def smoke_trainer(max_steps: int = 3):
    """A Lightning Trainer for smoke runs: CPU, no logger, no checkpoints, our sampler kept."""
    import lightning as L

    return L.Trainer(
        max_steps=max_steps,
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
        log_every_n_steps=1,
    )
