"""Character-level LSTM language model: Karpathy's char-rnn in the style of the TensorFlow/Keras
text-generation tutorial (embed each character, stacked LSTMs, a softmax over the vocabulary,
trained on 100-character windows to predict every next character).

Data: tiny Shakespeare through tensorflow-datasets (Kiln's test split is its last 10%, nanoGPT's
validation split), or any UTF-8 text file (``--dataset path.txt``, last 10% held out). The
vocabulary is the dataset's ``class_names`` and is stored in the manifest with the model.
Reference: nanoGPT's 6-layer transformer reaches 1.47 nats/char on that validation split.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
from keras import layers

from kiln import KilnError, Plugin, Scalar, inference, param

MAX_PROMPT = 10_000
MAX_CHARS = 5_000


@dataclass
class LSTMConfig:
    embedding: int = param(64, min=1, max=4096, help="size of the character embedding")
    units: tuple[int, ...] = param((256, 256), min=1, max=4096, help="units of each LSTM layer")
    dropout: float = param(0.1, min=0.0, max=0.9, help="dropout between LSTM layers")
    learning_rate: float = param(2e-3, min=0.0, max=1.0)
    clipnorm: float = param(1.0, min=0.0, max=100.0, help="gradient norm clipping (0: off)")


def build_lstm(config: LSTMConfig, vocab: int) -> tuple[keras.Model, keras.Model]:
    """The training model (ids -> next-character logits) and a step model sharing its layers that
    also takes and returns every LSTM's (h, c) state, for generation one character at a time."""
    ids = keras.Input(shape=(None,), dtype="int32", name="ids")
    embed = layers.Embedding(vocab, config.embedding, name="embedding")
    lstms = [layers.LSTM(u, return_sequences=True, return_state=True, name=f"lstm{i + 1}")
             for i, u in enumerate(config.units)]
    drop = layers.Dropout(config.dropout)
    head = layers.Dense(vocab, name="logits", dtype="float32")

    def run(x, initial):
        x = embed(x)
        states = []
        for i, lstm in enumerate(lstms):
            x, h, c = lstm(x, initial_state=initial[i] if initial else None)
            states.append((h, c))
            x = drop(x)
        return head(x), states

    logits, _ = run(ids, None)
    model = keras.Model(ids, logits, name="char_lstm")
    step_ids = keras.Input(shape=(None,), dtype="int32", name="step_ids")
    state_in = [[keras.Input(shape=(u,), name=f"{k}{i + 1}") for k in ("h", "c")]
                for i, u in enumerate(config.units)]
    step_logits, state_out = run(step_ids, state_in)
    step = keras.Model([step_ids, *[t for hc in state_in for t in hc]],
                       [step_logits, *[t for hc in state_out for t in hc]], name="char_lstm_step")
    return model, step


class CharLSTM(Plugin):
    name = "lstm"
    description = "Character-level LSTM language model (char-rnn); generates and scores text"
    Config = LSTMConfig
    dataset = "tiny_shakespeare"
    epochs = 30
    batch_size = 128
    headline = "nats_per_char"

    @classmethod
    def no_export_reason(cls) -> str:
        return (f"{cls.name} takes text and runs a loop over characters around its network (generate "
                "samples one character at a time, score walks the text); no single network maps its input "
                "to its output, so there is nothing to export")

    def setup(self, info):
        if not info.extra.get("text"):
            raise KilnError(f"lstm models text; dataset {info.name} is not text (use "
                            "tiny_shakespeare or a path to a .txt file)")
        super().setup(info)
        self.vocab = "".join(info.class_names)
        self.index = {c: i for i, c in enumerate(self.vocab)}
        self._generate = None

    def preprocess(self, x, y):
        import tensorflow as tf

        return tf.cast(x, "int32"), tf.cast(y, "int32")

    def build(self):
        model, self.step_model = build_lstm(self.config, len(self.vocab))
        opt = keras.optimizers.Adam(self.config.learning_rate,
                                    clipnorm=self.config.clipnorm or None)
        model.compile(optimizer=opt,
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        return model

    def evaluate(self, model, test):
        nats = float(model.evaluate(test, verbose=0, return_dict=True)["loss"])
        return {"nats_per_char": nats, "bits_per_char": nats / math.log(2),
                "perplexity": math.exp(nats)}

    def samples(self, model, test, out_dir: Path) -> list[Path]:
        text = self.generate(model, prompt="ROMEO:" if "R" in self.index else self.vocab[0],
                             max_chars=600, temperature=0.8, seed=0)["text"]
        path = out_dir / "sample.txt"
        path.write_text(text)
        return [path]

    # -- inference ----------------------------------------------------------------------
    def encode(self, text: str, what: str) -> np.ndarray:
        unknown = sorted(set(text) - set(self.index))
        if unknown:
            shown = ", ".join(repr(c) for c in unknown[:10])
            raise KilnError(f"{what} has {len(unknown)} character(s) outside the model's "
                            f"vocabulary: {shown}. Remove or replace them; the model knows these "
                            f"{len(self.vocab)} characters: {self.vocab!r}")
        return np.array([self.index[c] for c in text], dtype="int32")

    def _generator(self):
        import tensorflow as tf

        if self._generate is None:
            step = self.step_model
            zeros = [tf.zeros((1, u)) for u in self.config.units for _ in (0, 1)]

            @tf.function(input_signature=[tf.TensorSpec([1, None], tf.int32),
                                          tf.TensorSpec([], tf.int32),
                                          tf.TensorSpec([], tf.float32),
                                          tf.TensorSpec([], tf.int32)])
            def generate(prompt, n, temperature, seed):
                logits, *states = step([prompt, *zeros])
                out = tf.TensorArray(tf.int32, size=n)
                for i in tf.range(n):
                    nxt = tf.random.stateless_categorical(logits[:, -1] / temperature, 1,
                                                          seed=tf.stack([seed, i]), dtype=tf.int32)
                    out = out.write(i, nxt[0, 0])
                    logits, *states = step([nxt, *states])
                return out.stack()

            self._generate = generate
        return self._generate

    @inference(prompt=Scalar(str, min=1, max=MAX_PROMPT, alphabet=True,
                             description=f"text to continue (1 to {MAX_PROMPT} characters of the "
                                         "model's vocabulary)"),
               max_chars=Scalar(int, 200, min=1, max=MAX_CHARS, description="characters to add"),
               temperature=Scalar(float, 1.0, min=0.01, max=5.0,
                                  description="below 1: safer, above 1: more surprising"),
               seed=Scalar(int, 0, min=0, max=2**31 - 1, description="same seed, same text"),
               outputs={"text": "prompt followed by the continuation",
                        "continuation": "the generated characters only"})
    def generate(self, model, prompt, max_chars, temperature, seed):
        """Continue a prompt, one sampled character at a time (deterministic for a seed)."""
        ids = self.encode(prompt, "prompt")[None]
        out = self._generator()(ids, np.int32(max_chars), np.float32(temperature), np.int32(seed))
        continuation = "".join(self.vocab[i] for i in out.numpy())
        return {"text": prompt + continuation, "continuation": continuation}

    @inference(text=Scalar(str, min=2, max=MAX_PROMPT * 10, alphabet=True,
                           description=f"text of 2 to {MAX_PROMPT * 10} characters of the model's vocabulary"),
               outputs={"nats_per_char": "mean loss predicting each character from those before",
                        "bits_per_char": "the same in bits",
                        "per_char": "loss of each character after the first, in nats"})
    def score(self, model, text):
        """How surprising a text is to the model: per-character loss after the first character."""
        per_char = self.char_losses(model, self.encode(text, "text"))
        nats = float(per_char.mean())
        return {"nats_per_char": nats, "bits_per_char": nats / math.log(2),
                "per_char": per_char.round(4).tolist()}

    def char_losses(self, model, ids: np.ndarray) -> np.ndarray:
        """The loss of each character after the first, in nats, the whole text in one pass (the
        LSTM carries its state along it)."""
        return nll(model.predict_on_batch(ids[None, :-1])[0], ids[1:])


def nll(logits, targets: np.ndarray) -> np.ndarray:
    """-log softmax(logits)[target] per position, in float64."""
    logits = np.asarray(logits, dtype="float64")
    logits = logits - logits.max(axis=-1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(axis=-1, keepdims=True))
    return -logp[np.arange(len(targets)), targets]
