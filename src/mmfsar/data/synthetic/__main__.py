"""python -m mmfsar.data.synthetic: generate (or confirm) the synthetic dataset at data.root."""

import hydra
from omegaconf import DictConfig

from mmfsar.utils.paths import CONFIG_DIR


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="generate")
def main(cfg: DictConfig) -> None:
    from mmfsar.data.synthetic import ensure_synthetic

    if cfg.data.get("generator") is None:
        raise SystemExit(f"data={cfg.data.root}: this data config has no generator settings")
    root = ensure_synthetic(cfg.data.root, cfg.data.generator, workers=cfg.workers)
    print(f"synthetic dataset ready: {root}")


if __name__ == "__main__":
    main()
