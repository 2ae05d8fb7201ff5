"""Data checks (A2 data quality: a source that is missing, unreadable, filtered away or mis-weighted
trains a different model than the spec describes, silently)."""
from __future__ import annotations

from forge.checklist.context import CheckContext
from forge.checklist.registry import Outcome, failed, passed, register


@register("data_sources")
def data_sources(ctx: CheckContext, mixture_batches: int = 20, tolerance: float = 0.02) -> Outcome:
    """A2: every source resolves and is readable, keeps training and held-out documents after the filters
    (drop counts per filter reported), the tokenizer has model.vocab_size tokens and round-trips a
    document of every source, and the realised token mixture over the first `mixture_batches` batches
    is within `tolerance` of the spec's weights."""
    from forge.data import build_data
    from forge.errors import ForgeError

    spec = ctx.spec
    expected = (f"every source non-empty after filters; vocab {spec.model.vocab_size}; decode(encode(x)) == x; "
                f"mixture within {100 * tolerance:g} pp over {mixture_batches} batches")
    try:
        data = ctx.cached("data", lambda: build_data(spec.data, vocab_size=spec.model.vocab_size,
                                                     seed=spec.run.seed, data_dir=ctx.data_dir))
    except ForgeError as err:
        return failed("sources not loadable", expected, str(err))
    tokenizer = data.tokenizer
    mixture = data.mixture_report(mixture_batches)
    problems, lines, table = [], [], {}
    if tokenizer.vocab_size != spec.model.vocab_size:
        problems.append(f"tokenizer has {tokenizer.vocab_size} tokens, model.vocab_size is {spec.model.vocab_size}")
    for source in data.sources:
        train, held, realised = source.meta["train"], source.meta["eval"], mixture["sources"][source.name]
        sample = source.meta["sample_text"]
        if tokenizer.decode(tokenizer.encode(sample)) != sample:
            problems.append(f"{source.name}: decode(encode(x)) != x on a training document")
        if abs(realised["share"] - realised["target"]) > tolerance:
            problems.append(f"{source.name}: {100 * realised['share']:.1f}% of tokens, "
                            f"spec {100 * realised['target']:g}%")
        dropped = {k[len("dropped_"):]: v for k, v in train.items() if k.startswith("dropped_") and v}
        drops = ", ".join(f"{k} {v} ({100 * v / train['documents']:.0f}%)" for k, v in dropped.items()) or "none"
        lines.append(f"{source.name}: {train['documents']} docs read, dropped {drops}; {train['kept']} packed "
                     f"({train['split_pieces']} extra from cutting at max_length), {train['tokens']:,} tokens; "
                     f"eval {held['kept']} packed, {held['tokens']:,} tokens; {100 * realised['share']:.1f}% of "
                     f"the mixture (spec {100 * realised['target']:g}%)")
        for key in ("documents", "kept", "tokens", "dropped_quality", "dropped_overlap", "dropped_min_length"):
            table[f"{source.name}/train_{key}"] = train[key]
        table[f"{source.name}/eval_docs"], table[f"{source.name}/eval_tokens"] = held["kept"], held["tokens"]
        table[f"{source.name}/share"] = realised["share"]
    table["loader_ms_per_batch"] = mixture["loader_ms_per_batch"]
    worst = max(abs(r["share"] - r["target"]) for r in mixture["sources"].values())
    measured = (f"{len(data.sources)} sources, {sum(s.meta['train']['tokens'] for s in data.sources):,} train tokens; "
                f"mixture off by <= {100 * worst:.2f} pp")
    detail = "; ".join(problems + lines)
    return (failed if problems else passed)(measured, expected, detail, table)
