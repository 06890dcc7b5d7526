"""Character-level Transformer language model: a small decoder-only GPT in the style of nanoGPT
(Karpathy), in Keras 3. Token and position embeddings, pre-norm blocks of causal multi-head
self-attention and a GELU MLP with residual connections and dropout, a final layer norm and a
softmax over the vocabulary; AdamW (no weight decay on biases, norms and embeddings) with a linear
warm-up and a cosine decay, gradient clipping.

Data: the same as ``lstm`` (kiln.data's text windows: tiny Shakespeare or any UTF-8 ``.txt``,
the same vocabulary and split), so the two models' nats/char compare directly. The context is
the data's window (``kiln.data.TEXT_WINDOW`` characters): the model learns positions 0 to
``context - 1``, and generation keeps the last ``context`` characters of the text it has so far.

Generation runs one compiled graph (``tf.function`` with a ``tf.while_loop``) over a fixed-size
window: every step is the same-shaped forward pass, so the graph is traced once per model and a
prompt of any length costs no retrace. ``attention`` returns one layer's attention weights over a
text (the gallery's attention map).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
from keras import layers

from kiln import KilnError, Scalar, attention_map, inference, param
from kiln.plugins.lstm import MAX_CHARS, MAX_PROMPT, CharLSTM, nll


@dataclass
class GPTConfig:
    layers: int = param(4, min=1, max=48, help="Transformer blocks")
    heads: int = param(4, min=1, max=64, help="attention heads per block (width must divide by it)")
    width: int = param(128, min=8, max=4096, help="size of the token embedding and each block's stream")
    dropout: float = param(0.1, min=0.0, max=0.9, help="dropout after attention, the MLP and embeddings")
    learning_rate: float = param(1.5e-3, min=0.0, max=1.0, help="peak learning rate, after warm-up")
    min_lr_ratio: float = param(0.1, min=0.0, max=1.0, help="learning rate at the end, a fraction of the peak")
    warmup_steps: int = param(200, min=0, max=1_000_000, help="steps of linear warm-up from 0")
    weight_decay: float = param(0.1, min=0.0, max=10.0, help="AdamW weight decay (kernels only)")
    beta_2: float = param(0.99, min=0.0, max=0.99999, help="AdamW beta_2 (nanoGPT: 0.99 for small data)")
    clipnorm: float = param(1.0, min=0.0, max=100.0, help="gradient norm clipping (0: off)")

    def validate(self) -> None:
        if self.width % self.heads:
            raise KilnError(f"width {self.width} must be a multiple of heads {self.heads} "
                            "(each head gets width / heads dimensions)")


class PositionEmbedding(layers.Layer):
    """A learned vector per position 0..context-1, added to the token embeddings (positions
    come from the input's length at run time, which a functional graph cannot compute itself)."""

    def __init__(self, context: int, width: int, **kwargs):
        super().__init__(**kwargs)
        self.table = layers.Embedding(context, width, name="embeddings")

    def build(self, input_shape):
        self.table.build((None,))

    def call(self, x):
        return x + self.table(keras.ops.arange(keras.ops.shape(x)[1]))[None]


def build_gpt(config: GPTConfig, vocab: int, context: int) -> tuple[keras.Model, keras.Model]:
    """The training model (ids -> next-character logits at every position) and a model sharing
    its layers that returns each block's attention weights (batch, heads, query, key)."""
    ids = keras.Input(shape=(None,), dtype="int32", name="ids")
    tokens = layers.Embedding(vocab, config.width, name="token_embedding")
    positions = PositionEmbedding(context, config.width, name="position_embedding")
    drop = layers.Dropout(config.dropout)
    blocks = []
    for i in range(config.layers):
        blocks.append({
            "ln1": layers.LayerNormalization(epsilon=1e-5, name=f"block{i + 1}_ln1"),
            "attn": layers.MultiHeadAttention(config.heads, config.width // config.heads, dropout=config.dropout,
                                              name=f"block{i + 1}_attention"),
            "drop1": layers.Dropout(config.dropout),
            "ln2": layers.LayerNormalization(epsilon=1e-5, name=f"block{i + 1}_ln2"),
            "up": layers.Dense(4 * config.width, activation="gelu", name=f"block{i + 1}_mlp_up"),
            "down": layers.Dense(config.width, name=f"block{i + 1}_mlp_down"),
            "drop2": layers.Dropout(config.dropout),
        })
    ln_f = layers.LayerNormalization(epsilon=1e-5, name="ln_final")
    head = layers.Dense(vocab, name="logits", dtype="float32")

    def run(x):
        h = drop(positions(tokens(x)))
        scores = []
        for b in blocks:
            a = b["ln1"](h)
            a, s = b["attn"](a, a, use_causal_mask=True, return_attention_scores=True)
            h = h + b["drop1"](a)
            h = h + b["drop2"](b["down"](b["up"](b["ln2"](h))))
            scores.append(s)
        return head(ln_f(h)), scores

    logits, scores = run(ids)
    return keras.Model(ids, logits, name="char_gpt"), keras.Model(ids, scores, name="char_gpt_attention")


class CharGPT(CharLSTM):
    """The lstm's data, encoding, evaluation and ``score``; a Transformer's network, its own
    generation and its windows over a long text (``char_losses``)."""

    name = "gpt"
    description = "Character-level Transformer (nanoGPT-style GPT); generates and scores text, shows attention"
    Config = GPTConfig
    epochs = 25  # sized to half the lstm default's wall time (BENCHMARKS.md)
    batch_size = 64

    def setup(self, info):
        super().setup(info)
        self.context = int(info.input_shape[0])

    def build(self):
        c = self.config
        model, self.attention_model = build_gpt(c, len(self.vocab), self.context)
        total = max(1, self.total_steps)
        warmup = min(c.warmup_steps, total // 2)
        # linear from 0 to the peak over the warm-up, then a cosine down to min_lr_ratio x peak
        schedule = keras.optimizers.schedules.CosineDecay(
            0.0, decay_steps=max(1, total - warmup), alpha=c.min_lr_ratio, warmup_target=c.learning_rate,
            warmup_steps=warmup) if warmup else keras.optimizers.schedules.CosineDecay(
            c.learning_rate, decay_steps=total, alpha=c.min_lr_ratio)
        opt = keras.optimizers.AdamW(schedule, weight_decay=c.weight_decay, beta_1=0.9, beta_2=c.beta_2,
                                     clipnorm=c.clipnorm or None)
        # nanoGPT's rule: decay the matrices that multiply (kernels), not biases, norms or embeddings
        opt.exclude_from_weight_decay(var_names=["bias", "gamma", "beta", "embeddings"])
        model.compile(optimizer=opt, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        self._generate = None
        return model

    # -- inference ----------------------------------------------------------------------
    def _generator(self, net):
        import tensorflow as tf

        if self._generate is None:
            c = self.context

            @tf.function(input_signature=[tf.TensorSpec([1, None], tf.int32),  # the window to start from
                                          tf.TensorSpec([], tf.int32),          # characters to add
                                          tf.TensorSpec([], tf.float32),        # temperature
                                          tf.TensorSpec([], tf.int32),          # top_k (0: all)
                                          tf.TensorSpec([], tf.int32)])         # seed
            def generate(prompt, n, temperature, top_k, seed):
                # a fixed [1, context] window: the text so far left-aligned and padded; causal
                # attention makes the padding after position length-1 invisible to it
                length = tf.shape(prompt)[1]
                window = tf.concat([prompt, tf.zeros([1, c - length], tf.int32)], axis=1)
                out = tf.TensorArray(tf.int32, size=n)
                vocab = len(self.vocab)
                k = tf.where(top_k > 0, tf.minimum(top_k, vocab), vocab)
                for i in tf.range(n):
                    logits = net(window, training=False)[0, length - 1] / temperature
                    kth = tf.math.top_k(logits, k).values[-1]
                    logits = tf.where(logits < kth, tf.fill(tf.shape(logits), -1e9), logits)
                    nxt = tf.random.stateless_categorical(logits[None], 1, seed=tf.stack([seed, i]),
                                                          dtype=tf.int32)[0, 0]
                    out = out.write(i, nxt)
                    if length < c:
                        window = tf.tensor_scatter_nd_update(window, [[0, length]], [nxt])
                        length += 1
                    else:  # full: slide by one
                        window = tf.concat([window[:, 1:], [[nxt]]], axis=1)
                return out.stack()

            self._generate = generate
        return self._generate

    def samples(self, model, test, out_dir: Path) -> list[Path]:
        paths = super().samples(model, test, out_dir)
        line = "ROMEO:\nBut soft, what light through yonder window breaks?"
        if set(line) <= set(self.index):
            att = self.attention(model, text=line, layer=self.config.layers)["weights"]
            paths.append(attention_map(np.asarray(att).mean(axis=0), list(line),
                                              out_dir / "attention.png",
                                              title=f"block {self.config.layers}: attention, mean over heads"))
        return paths

    @inference(prompt=Scalar(str, min=1, max=MAX_PROMPT, alphabet=True,
                             description=f"text to continue (1 to {MAX_PROMPT} characters of the model's "
                                         "vocabulary; the model sees its last context characters)"),
               max_chars=Scalar(int, 200, min=1, max=MAX_CHARS, description="characters to add"),
               temperature=Scalar(float, 1.0, min=0.01, max=5.0,
                                  description="below 1: safer, above 1: more surprising"),
               top_k=Scalar(int, 0, min=0, max=1024,
                            description="sample among the k likeliest characters only (0: all)"),
               seed=Scalar(int, 0, min=0, max=2**31 - 1, description="same seed, same text"),
               outputs={"text": "prompt followed by the continuation",
                        "continuation": "the generated characters only"})
    def generate(self, model, prompt, max_chars, temperature, seed, top_k=0):
        """Continue a prompt, one sampled character at a time (deterministic for a seed)."""
        ids = self.encode(prompt, "prompt")[-self.context:][None]
        out = self._generator(model)(ids, np.int32(max_chars), np.float32(temperature), np.int32(top_k),
                                np.int32(seed))
        continuation = "".join(self.vocab[i] for i in out.numpy())
        return {"text": prompt + continuation, "continuation": continuation}

    def char_losses(self, model, ids: np.ndarray) -> np.ndarray:
        """``score``'s loss per character after the first. Past the context, windows overlap by
        half a context, so every character is predicted from at least context / 2 characters
        before it, and scored once."""
        inputs, targets, c = ids[:-1], ids[1:], self.context
        per_char = np.empty(len(targets))
        pos = 0  # the next target to score
        while pos < len(targets):
            start = max(0, pos - c // 2)
            end = min(len(targets), start + c)
            # one shape for every window (padded at the end, which causal attention hides from
            # the positions before it): the predict function is traced once
            window = np.zeros((1, min(c, len(inputs))), "int32")
            window[0, :end - start] = inputs[start:end]
            logits = model.predict_on_batch(window)[0, :end - start]
            per_char[pos:end] = nll(logits[pos - start:], targets[pos:end])
            pos = end
        return per_char

    @inference(text=Scalar(str, min=1, max=MAX_PROMPT, alphabet=True,
                           description="a line to look at (its last context characters are used)"),
               layer=Scalar(int, default=1, min=1, description="which block (1: the first)"),
               outputs={"weights": "attention weights (heads, query, key): how much each character "
                                   "attends to each earlier one",
                        "characters": "the characters of the rows and columns"})
    def attention(self, model, text, layer):
        """Which earlier characters each character looks at, per head, in one block."""
        if layer > self.config.layers:
            raise KilnError(f"'layer' must be 1..{self.config.layers}: this model has "
                            f"{self.config.layers} blocks")
        ids = self.encode(text, "text")[-self.context:]
        scores = self.attention_model.predict_on_batch(ids[None])
        scores = scores if isinstance(scores, list) else [scores]
        return {"weights": np.asarray(scores[layer - 1])[0].round(4),
                "characters": [self.vocab[i] for i in ids]}

