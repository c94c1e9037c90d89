"""Stage 1: per-modality encoders (and the fusion teacher). See configs/pretrain.yaml."""

import hydra
from omegaconf import DictConfig

import mmfsar.utils  # noqa: F401  (anchors paths.root_dir at the repository)


@hydra.main(version_base="1.3", config_path="configs", config_name="pretrain")
def main(cfg: DictConfig) -> float | None:
    from mmfsar.tasks.pipelines import train

    return train(cfg).get("val/acc")


if __name__ == "__main__":
    main()
