"""What reads a checkpoint: sampling, evaluation, export, benchmarks (never imports train/).

    backends.py   torch (fp32 / bf16, optional compiled decode step), int8, ONNX Runtime behind one interface
    generate.py   the no-cache reference loop and streamed text (the loop itself: model/generation.py)
    stops.py      stop strings and tokens: where a completion ends (eval.sample and the server)
    sample.py     `python -m eval.sample`: streamed text from a checkpoint or an exported ONNX decoder
    evaluate.py   `python -m eval.evaluate`: loss, perplexity, bits per byte on a dataset split
    export.py     `python -m eval.export`: ONNX (fp32 / int8), torch.export .pt2, int8 artifacts, each checked
    hf.py         `python -m eval.hf import|export`: Hugging Face GPT-2 directories <-> model artifacts
    hellaswag_score.py  the HellaSwag scoring loop (training's periodic evaluation runs it too)
    hellaswag.py  `python -m eval.hellaswag`: HellaSwag acc / acc_norm, llm.c's or lm-eval's way, under torchrun too
    harness.py    `python -m eval.harness`: lm-evaluation-harness tasks through our engine (model class "gptrain")
    bench.py      `python -m eval.bench`: decode / prefill tokens/s and sizes against the goals
    cli.py        UsageError and --dtype parsing; the command runner (model/cli.py) behind every eval command
    serve/        `python -m eval.serve`: the OpenAI-compatible server with continuous batching
The transforms themselves live beside the model: model/quantize.py and model/onnx_export.py.
"""
