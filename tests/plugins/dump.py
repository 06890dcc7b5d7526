"""Test plugins: each built-in plugin with its own train_step or data handling, unchanged, plus one probe. After every epoch
each worker writes all its weights (trainable, batch-norm statistics, and every optimizer's
state) to $KILN_PROBE_DIR/<plugin>-rank<r>-epoch<e>.npz, so a test can compare the workers."""

import os
from pathlib import Path

import numpy as np

from kiln.plugins.autoencoder import Autoencoder
from kiln.plugins.cgan import CGAN
from kiln.plugins.dcgan import DCGAN
from kiln.plugins.diffusion import DiffusionPlugin
from kiln.plugins.gpt import CharGPT
from kiln.plugins.har import HAR
from kiln.plugins.lstm import CharLSTM
from kiln.plugins.transfer import Transfer
from kiln.plugins.vae import VAE
from kiln.checkpoint import optimizers


class Dump:
    def on_epoch_end(self, model, epoch, logs, rank):
        super().on_epoch_end(model, epoch, logs, rank)
        arrays = [np.asarray(w) for w in model.weights]
        arrays += [np.asarray(v) for opt in optimizers(model) for v in opt.variables]
        out = Path(os.environ["KILN_PROBE_DIR"])
        np.savez(out / f"{self.name}-rank{rank}-epoch{epoch}.npz", *arrays)


class DumpAutoencoder(Dump, Autoencoder):
    name = "dump_autoencoder"


class DumpVAE(Dump, VAE):
    name = "dump_vae"


class DumpDCGAN(Dump, DCGAN):
    name = "dump_dcgan"


class DumpCGAN(Dump, CGAN):
    name = "dump_cgan"


class DumpHAR(Dump, HAR):
    name = "dump_har"


class DumpLSTM(Dump, CharLSTM):
    name = "dump_lstm"


class DumpDiffusion(Dump, DiffusionPlugin):
    name = "dump_diffusion"


class DumpGPT(Dump, CharGPT):
    name = "dump_gpt"


class DumpTransfer(Dump, Transfer):
    name = "dump_transfer"
