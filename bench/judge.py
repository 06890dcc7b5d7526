"""The cnn that judges generated digits in the benches: the keras-io MNIST convnet, Kiln's former
`cnn` default. The generative figures and bars in BENCHMARKS.md were judged by this network;
training the judge with these settings keeps new figures comparable with them."""

JUDGE = {"filters": "32,64", "convs": "1", "hidden": "0", "dropout": "0.5", "schedule": "constant",
         "learning_rate": "1e-3", "augment": "none"}
EPOCHS = 12  # keras-io's recipe as Kiln ran it (the cnn default's epochs when it was this network)
