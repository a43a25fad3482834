"""The prepare transform (``data/prepare.py``) as an Apache Beam pipeline, for corpora bigger than one machine.

``run_beam(inputs, dest, runner=..., pipeline_args=[...], tokenizer=..., seq_len=..., ...)`` takes the options of
``prepare.prepare`` and writes the same files (shards byte for byte, the same manifest, the same ``progress/``)::

    Create(unit indices) -> Reshuffle -> ParDo(tokenize + pack + write shard i)  -> AsList --+
    Create(source indices) -> Reshuffle -> ParDo(size + sha256 of source j)      -> AsList --+-> write manifest.json

The plan (validation, unit listing, ``progress/args.json``) runs on the launching machine, before the pipeline;
workers only need the inputs, the destination and the tokenizer to be readable where they run (a bucket, or a
``mistral:`` name). A unit whose shard a previous run (or a retried bundle) finished is kept, as in the local
prepare: a failed Dataflow job rerun with the same arguments continues.

Runners (install ``pip install 'mistral_jax[beam]'`` and, on Dataflow, ship this package with ``--setup_file`` or a
custom container with mistral_jax installed)::

    # in process (tests, small corpora)
    python -m mistral_jax.data.prepare --runner beam:DirectRunner --inputs ... --dest ... --tokenizer ... --seq_len N
    # Google Cloud Dataflow
    python -m mistral_jax.data.prepare --runner beam:DataflowRunner --inputs 'gs://bkt/raw/**/*.jsonl.zst' \\
        --dest gs://bkt/prepared/web --tokenizer mistral:v3 --seq_len 4096 -- \\
        --project MY_PROJECT --region us-central1 --temp_location gs://bkt/tmp --setup_file ./setup.py \\
        --max_num_workers 64
    # Flink / Spark (a running cluster; the job server is started by Beam)
    ... --runner beam:FlinkRunner -- --flink_master host:8081 --environment_type LOOPBACK
    ... --runner beam:SparkRunner -- --spark_master_url spark://host:7077

The arguments after ``--`` are Beam's ``PipelineOptions`` (``pipeline_args`` here). Units are independent, so the
runner may process them in any order, on any number of workers, with retries: a shard is written whole or not at all
(``prepared.ShardWriter``) under its unit's name.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from mistral_jax.data import prepare as prep


def _process_unit(index: int, p: prep.Plan) -> dict[str, Any]:
    return {"index": index, **prep.process_unit(p, index)}


def _process_source(index: int, p: prep.Plan) -> dict[str, Any]:
    return {"index": index, **prep.process_source(p, index)}


def _write_manifest(_: Any, p: prep.Plan, entries: list[dict[str, Any]], sources: list[dict[str, Any]]
                    ) -> dict[str, Any]:
    entries = [{k: v for k, v in e.items() if k != "index"} for e in sorted(entries, key=lambda e: e["index"])]
    sources = [{k: v for k, v in s.items() if k != "index"} for s in sorted(sources, key=lambda s: s["index"])]
    if len(entries) != len(p.units) or len(sources) != len(p.sources):
        raise RuntimeError(f"the pipeline returned {len(entries)} of {len(p.units)} units and {len(sources)} of "
                           f"{len(p.sources)} sources. Fix: rerun it (finished units are kept).")
    return prep.finish(p, entries, sources)


def run_beam(inputs: str | Sequence[str], dest: str, *, runner: str = "DirectRunner",
             pipeline_args: Sequence[str] | None = None, tokenizer: str, seq_len: int, format: str = "text",
             pack: bool = True, add_bos: bool = True, add_eos: bool = True, text_field: str = "text",
             messages_field: str = "messages", pairs_per_row: int = 1, skip_invalid: bool = False,
             on_decode_error: str = "replace", shard_bytes: int = prep.DEFAULT_SHARD_BYTES) -> dict[str, Any]:
    """Prepare ``inputs`` into ``dest`` with a Beam pipeline on ``runner``; returns the manifest (read back from
    ``dest``)."""
    try:
        import apache_beam as beam
        from apache_beam.options.pipeline_options import PipelineOptions
    except ImportError as e:
        raise prep.PrepareError(f"the Beam runner needs apache-beam ({e}). Fix: pip install 'mistral_jax[beam]', or "
                                "use the local runner (--runner local).") from None
    from mistral_jax.data import prepared

    opts = prep.Options(tokenizer=str(tokenizer), seq_len=seq_len, format=format, pack=bool(pack),
                        add_bos=bool(add_bos), add_eos=bool(add_eos), text_field=text_field,
                        messages_field=messages_field, pairs_per_row=int(pairs_per_row),
                        skip_invalid=bool(skip_invalid), on_decode_error=on_decode_error)
    p = prep.plan(inputs, dest, opts, shard_bytes=shard_bytes)
    prep._clean_partials(p.dest)
    options = PipelineOptions([f"--runner={runner}", *(pipeline_args or [])])
    with beam.Pipeline(options=options) as pipeline:
        entries = (pipeline
                   | "Units" >> beam.Create(list(range(len(p.units))))
                   | "SpreadUnits" >> beam.Reshuffle()
                   | "TokenizePackWrite" >> beam.Map(_process_unit, p))
        sources = (pipeline
                   | "Sources" >> beam.Create(list(range(len(p.sources))))
                   | "SpreadSources" >> beam.Reshuffle()
                   | "Fingerprint" >> beam.Map(_process_source, p))
        _ = (pipeline
             | "Once" >> beam.Create([None])
             | "Manifest" >> beam.Map(_write_manifest, p, beam.pvalue.AsList(entries), beam.pvalue.AsList(sources)))
    return prepared.read_manifest(p.dest)
