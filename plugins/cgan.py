"""Conditional GAN on MNIST (keras-io "Conditional GAN" idea, on plugins/dcgan.py's networks):
the generator gets the one-hot digit next to z and the discriminator gets it as ten extra image
planes, so the generator learns to draw the digit it is asked for. Because the class enters the
generator as a vector, a soft mix of two one-hot vectors with fixed noise morphs one digit into
another (``interpolate``).

Measured with Kiln's own CNN (kiln.quality): the share of generated digits the CNN classifies as
the requested one (label accuracy).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kiln import KilnError, Scalar, grid, inference, line, param
from kiln.plugins.dcgan import DCGANConfig, GANPlugin, latent, to_unit


@dataclass
class CGANConfig(DCGANConfig):
    width: int = param(64, min=4, max=1024, help="filters of the widest convolution")


class CGAN(GANPlugin):
    name = "cgan"
    description = "Conditional GAN: generate a chosen digit, morph one digit into another"
    headline = "label_accuracy"
    condition = "digit"
    Config = CGANConfig

    def setup(self, info):
        if info.num_classes < 2:
            raise KilnError(f"cgan needs labelled images; dataset {info.name} has no classes")
        super().setup(info)
        self.num_classes = info.num_classes

    def progress_picture(self, model, path, title):
        return self.class_grid(model, path, f"one row per class (seed 0), {title}")

    def class_grid(self, model, path: Path, title: str) -> Path:
        k = self.num_classes
        rows = [self.sample(model, c, 10, 0)["images"] for c in range(k)]
        return grid(np.concatenate(rows), path, cols=10, title=title)

    def samples(self, model, test, out_dir: Path) -> list[Path]:
        k = self.num_classes
        rows = [self.interpolate(model, c, (c + 1) % k, 10, c)["images"] for c in range(k)]
        return [
            self.class_grid(model, out_dir / "samples.png", "one row per class (seed 0)"),
            grid(np.concatenate(rows), out_dir / "interpolation.png", cols=10,
                 title="class c to class c+1 with fixed noise (one per row)"),
        ]

    def _check_class(self, name: str, value: int) -> None:
        if not 0 <= value < self.num_classes:
            names = self.info.class_names
            raise KilnError(f"'{name}' must be a class index 0..{self.num_classes - 1}, got {value}"
                            + (f" (classes: {', '.join(names)})" if names else ""))

    @inference(digit=Scalar(int, min=0, description="the class to draw (0-9 for MNIST)"),
               n=Scalar(int, default=16, min=1, max=1024, count=True), seed=Scalar(int, default=0, min=0),
               outputs={"images": "n generated images of the class, values in [0, 1]",
                        "z": "the noise of each image"})
    def sample(self, model, digit, n, seed):
        """Generate n images of the chosen class (deterministic for a seed)."""
        self._check_class("digit", digit)
        z = latent(n, self.config.latent_dim, seed)
        return {"images": to_unit(model.generate(z, self.classes([digit] * n))), "z": z}

    @inference(a=Scalar(int, min=0, description="class to start from"),
               b=Scalar(int, min=0, description="class to end at"),
               steps=Scalar(int, default=10, min=2, max=100), seed=Scalar(int, default=0, min=0),
               outputs={"images": "images morphing from class a to class b, one noise vector"})
    def interpolate(self, model, a, b, steps, seed):
        """Morph class a into class b: fixed noise, the class vector moved from one-hot a to b."""
        self._check_class("a", a)
        self._check_class("b", b)
        classes = line(self.classes([a])[0], self.classes([b])[0], steps)
        z = np.repeat(latent(1, self.config.latent_dim, seed), steps, axis=0)
        return {"images": to_unit(model.generate(z, classes))}
