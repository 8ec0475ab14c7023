"""``kvfs demo``: an engine answering follow-up questions on a long context, with and without kvfs.

A Llama-architecture model with seeded random weights (nothing is
downloaded; its outputs are meaningless token ids, but its attention KV is
computed exactly like a trained model's) gets one long shared context
followed by several questions. The first request computes the context's KV
and kvfs stores it; the next ones load it and compute only their question.
For each request it prints the time to first token, the tokens reused and the
speedup against a full prefill measured in the same run, then what kvfs
stored, as ``kvfs ls -l`` shows it.
"""

from __future__ import annotations

import time

import click


def _fmt_s(s: float) -> str:
    return f"{s * 1e3:7.0f} ms" if s < 10 else f"{s:7.1f} s "


@click.command("demo")
@click.option("--context-tokens", default=4096, show_default=True, type=click.IntRange(16, 60000),
              help="Length of the shared context.")
@click.option("--questions", default=4, show_default=True, type=click.IntRange(1, 50),
              help="Follow-up requests on the same context.")
@click.option("--new-tokens", default=8, show_default=True, type=click.IntRange(1, 512),
              help="Tokens generated per request.")
@click.option("--size", type=click.Choice(["demo", "tiny"]), default="demo", show_default=True,
              help="Model size (tiny: for a quick check).")
@click.option("--seed", default=0, show_default=True, help="Seed of the random weights and of the context.")
def demo(context_tokens: int, questions: int, new_tokens: int, size: str, seed: int) -> None:
    """Show a model answering follow-ups on a long context many times faster with kvfs (CPU, random weights).

    Uses the store of ``kvfs --url`` ($KVFS_URL, else the embedded one).
    """
    try:
        import torch
        from kvfs.connectors.demo_model import build_model
        from kvfs.connectors.hf import CachedLM
    except ImportError as e:  # torch/transformers are the "engines" extra
        raise click.ClickException(
            f"kvfs demo needs torch and transformers ({e}); install them with: pip install 'kvfs[engines]'"
        ) from None
    from ._common import open_store

    click.echo("Building the model ... ", nl=False)
    t = time.perf_counter()
    model = build_model(size, seed=seed)
    cfg = model.config
    params = sum(p.numel() for p in model.parameters())
    click.echo(f"{time.perf_counter() - t:.1f} s")
    click.echo(
        f"Model: Llama architecture, RANDOM weights (seed {seed}; no download, so its answers are meaningless "
        f"token ids),\n       {cfg.num_hidden_layers} layers, {params / 1e6:.1f} M parameters, float32, "
        f"on the CPU ({torch.get_num_threads()} threads)."
    )
    vocab = cfg.vocab_size
    gen = torch.Generator().manual_seed(1000 + seed)
    context = torch.randint(0, vocab, (context_tokens,), generator=gen).tolist()
    qs = [torch.randint(0, vocab, (int(torch.randint(12, 32, (1,), generator=gen)),), generator=gen).tolist()
          for _ in range(questions)]

    store = open_store(create=True)  # closed (and flushed) when the command ends
    lm = CachedLM(model, store)
    click.echo(f"Store: {store.redacted_url}    namespace: {lm.spec.path}")
    click.echo(f"Prompt: a shared context of {context_tokens:,} tokens (seeded random token ids) followed by "
               f"{questions} different questions.\n")

    first = context + qs[0]
    _warm_up(model, vocab)
    base = CachedLM(model, store, spec=lm.spec, load=False, save=False).generate(first, new_tokens)
    click.echo(f"{'':10} {'prompt':>8} {'reused':>8} {'computed':>9} {'TTFT':>10} {'speedup':>8}")
    click.echo(f"{'baseline':10} {len(first):8,} {0:8,} {len(first):9,} {_fmt_s(base.ttft_s):>10} "
               f"{'1.0x':>8}   full prefill, kvfs not used")
    outputs = []
    for i, q in enumerate(qs, 1):
        r = lm.generate(context + q, new_tokens)
        outputs.append(r)
        p = r.prefill
        note = ""
        if i == 1:
            note = (f"   stored {r.stored_chunks} new chunks in {r.save_s * 1e3:.0f} ms (after the first token)"
                    if p.reused == 0 else "   the context was stored by an earlier run")
        click.echo(f"{'request ' + str(i):10} {p.prompt_tokens:8,} {p.reused:8,} {p.computed:9,} "
                   f"{_fmt_s(r.ttft_s):>10} {base.ttft_s / r.ttft_s:7.1f}x{note}")
    same = outputs[0].tokens == base.tokens
    click.echo(f"\nRequest 1's {new_tokens} greedy tokens are {'identical to' if same else 'DIFFERENT from'} "
               f"the full-prefill baseline's: {outputs[0].tokens}")
    warm = [r.ttft_s for r in outputs if r.prefill.reused]
    if warm:
        med = sorted(warm)[len(warm) // 2]
        ratio = base.ttft_s / med
        if ratio >= 1:
            versus = f"{ratio:.0f}x faster than" if ratio >= 10 else f"{ratio:.1f}x faster than"
        else:  # a context this short costs less to compute than to look up and load
            versus = f"{1 / ratio:.1f}x slower than"
        click.echo(f"Warm requests: median TTFT {med * 1e3:.0f} ms, {versus} the full prefill "
                   f"({_fmt_s(base.ttft_s).strip()}).")
    click.echo("\nWhat kvfs stored:")
    _print_listing(store, lm.spec)
    if not same:  # never expected: kvfs hands back exactly the KV the model computed
        raise click.ClickException("kvfs changed the model's output; please report this")


def _warm_up(model, vocab: int) -> None:
    """One short prefill and one cached step, so that one-time setup (allocator, kernels) is not timed."""
    import torch

    from kvfs.connectors.hf import output_cache, run_model

    with torch.inference_mode():
        ids = torch.arange(64).remainder(vocab).unsqueeze(0)
        out = run_model(model, ids)
        run_model(model, ids[:, :8], output_cache(out))


def _print_listing(store, spec) -> None:
    """What the CLI's ``kvfs ls -l`` prints for the model, then ``kvfs ls -lR`` of the namespace."""
    from .listing import ls

    store.flush()
    ctx = click.get_current_context()
    click.echo(f"$ kvfs ls -l {spec.model_dir}")
    ctx.invoke(ls, path=spec.model_dir, long=True, recursive=False, as_json=False)
    click.echo(f"$ kvfs ls -lR {spec.path}")
    ctx.invoke(ls, path=spec.path, long=True, recursive=True, as_json=False)
