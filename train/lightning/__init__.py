"""gptrain under PyTorch Lightning (the optional `lightning` extra): `python -m train.lightning`.

    module.py    GPTModule: gptrain's GPT, optimizer recipe (train/optim.py) and schedule as a LightningModule
    data.py      GPTDataModule: the prepared dataset (or mixture) in gptrain's batch order, resumable
    fit.py       the config -> lightning.Trainer arguments, and the run
    artifact.py  a Lightning checkpoint -> gptrain's model artifact (what eval/ opens)
    convert.py   `python -m train.lightning.convert`: that conversion as a command

Only this package imports lightning, and this file imports nothing, so that `python -m train.lightning`
can say how to install the extra when it is missing.
"""
