"""Text -> tokens -> shards on disk -> batches.

    tokenizer.py    get_tokenizer(spec): tiktoken names, .tiktoken files, `bytes`
    sources.py      documents from the embedded corpus, local files, the Hugging Face hub
    writer.py       streams tokens into llm.c-layout shards (val first, then train)
    prepare.py      `python -m data.prepare`: sources -> tokenizer -> shards + meta.json
    shards.py       the shard format: headers, memmaps, meta.json, validation
    permutation.py  a seeded permutation of the windows that needs no memory
    loader.py       BatchLoader (train, resumable across world sizes) and val_batches
    mixture.py      MixtureLoader: weighted mixtures of datasets (data.mix), weight schedules, epochs caps
    torch_data.py   torch.utils.data views: WindowDataset, StreamDataset, StreamDataLoader (stateful)
    inspect.py      `python -m data.inspect DIR_OR_CONFIG`: per source tokens, epochs of a run, windows
    hellaswag.py    HellaSwag: the rowanz JSONL reader and checks, llmc / harness rendering
    errors.py       DataError: every error a user can cause, with what to do about it
    bench.py        `python -m data.bench`: throughput, memory and loader figures
    machine.py      describe_cpu: the machine line every benchmark prints

Nothing is imported here, so that `import data.shards` does not pull in torch or datasets.
"""
