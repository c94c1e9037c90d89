"""Stage 2: distil frozen teachers into a student. See configs/distill.yaml."""

import hydra
from omegaconf import DictConfig

import mmfsar.utils  # noqa: F401  (anchors paths.root_dir at the repository)


@hydra.main(version_base="1.3", config_path="configs", config_name="distill")
def main(cfg: DictConfig) -> float | None:
    from mmfsar.tasks.pipelines import train

    return train(cfg).get("val/acc")


if __name__ == "__main__":
    main()
