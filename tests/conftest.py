from __future__ import annotations

from pathlib import Path

import pytest

from service.model.presets import get_preset
from service.model.synthetic import official_layout, save_official_checkpoint, synthetic_state_dict


@pytest.fixture(scope="session")
def official_weights(tmp_path_factory: pytest.TempPathFactory):
    """Official-format `.pth` files of synthetic weights, one per preset, made on first use."""
    made: dict[str, Path] = {}

    def get(preset: str) -> Path:
        if preset not in made:
            path = tmp_path_factory.mktemp("weights") / f"{preset}.pth"
            save_official_checkpoint(synthetic_state_dict(official_layout(get_preset(preset))), str(path))
            made[preset] = path
        return made[preset]

    return get


@pytest.fixture(scope="session")
def lite_weights() -> Path:
    """The shipped default model (weights/lite.safetensors): tests run what users get."""
    from service.config import SHIPPED_WEIGHTS

    if not SHIPPED_WEIGHTS.is_file():
        pytest.fail(f"{SHIPPED_WEIGHTS} is missing: the repository ships it (see weights/MODEL_CARD.md)")
    return SHIPPED_WEIGHTS
