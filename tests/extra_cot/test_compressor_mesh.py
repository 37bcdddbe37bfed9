"""The compressor trainer's mesh padding: rows appended by ``sharding.pad_rows`` with
``grades=-1`` (what experiments/train_compressor.train does) leave the classifier
and surprisal losses unchanged; zero-filled grades would not (grade 0 is a label)."""
import jax
import numpy as np
import pytest
from flax import nnx

from data.arithmetic import generate_problem, generate_problems, tokenizer_corpus
from data.formats import SEP
from data.tokenizers import train_sentencepiece
from experiments import cli
from experiments.extra_cot import train_compressor as tc
from models import sharding

CONFIG = "experiments/extra_cot/configs/compressor_test.py"


@pytest.fixture(scope="module")
def setup():
    config = cli.parse([f"--config={CONFIG}"])
    tok = train_sentencepiece(tokenizer_corpus(generate_problems(0, 120)), vocab_size=400)
    examples = tc.annotate([generate_problem(3, i) for i in range(6)], tok)
    ids, grades, _ = tc.pack_rows(examples, sep_id=tok.token_to_id(SEP), max_length=256,
                                  keep=config.labels.keep, grading=config.labels.grading)
    batch = tc.sample_batch(ids, grades, step=0, seed=1, batch_tokens=768, bucket=256)
    assert len(batch["tokens"]) == 3
    return config, tok, batch


@pytest.mark.parametrize("kind", ["formula", "surprisal"])
def test_unlabelled_padding_rows_leave_the_loss_unchanged(setup, kind):
    config, tok, batch = setup
    config = config.copy_and_resolve_references()
    config.kind = kind
    model = tc.build_model(config, tok.vocab_size, rngs=nnx.Rngs(0))
    loss_fn = tc.lm_loss if kind == "surprisal" else tc.classifier_loss
    loss = jax.jit(lambda m, b: loss_fn(m, b, None)[:2])
    padded = sharding.pad_rows(batch, 4, fill={"grades": -1})
    assert len(padded["tokens"]) == 4 and (padded["grades"][3] == -1).all()
    (total, denom), (total_p, denom_p) = loss(model, batch), loss(model, padded)
    assert float(denom_p) == float(denom) > 0
    np.testing.assert_allclose(float(total_p), float(total), rtol=1e-6)
    if kind == "formula":   # a zero fill would add labelled (grade 0) tokens
        _, denom_zero = loss(model, sharding.pad_rows(batch, 4))
        assert float(denom_zero) == float(denom) + padded["tokens"].shape[1]


def test_the_compressor_trains_on_the_pipeline_mesh(tmp_path, monkeypatch):
    """compressed_data.compressor hands the pipeline's ``mesh`` block to the
    compressor's config and the run's mesh (``rundir.Run.mesh``) to train_compressor."""
    from experiments import rundir  # noqa: PLC0415
    from experiments.extra_cot import compressed_data  # noqa: PLC0415

    run = rundir.Run(tmp_path)
    run.stage_dir("data")
    (tmp_path / "data" / "tokenizer.model").write_bytes(b"")   # only its path is read here
    config = cli.parse(["--config=experiments/extra_cot/configs/test.py", f"--config.run_dir={tmp_path}",
                        "--config.mesh.data=2", "--config.mesh.fsdp=-1", "--config.mesh.tensor=2"])
    seen, meshes = [], []
    the_run_mesh = object()        # a 2 x ? x 2 mesh needs 4 devices: the run's mesh stands in
    monkeypatch.setattr(run, "mesh", lambda cfg: the_run_mesh)
    monkeypatch.setattr(tc, "main", lambda cfg, mesh=None: (seen.append(cfg), meshes.append(mesh))
                        and {"loss": 1.0})
    assert compressed_data.compressor(config, run)["compressor/loss"] == 1.0
    assert meshes and all(m is the_run_mesh for m in meshes)   # the run's one mesh, not a new one
    assert [c.mesh.to_dict() for c in seen][:1] == [{"data": 2, "fsdp": -1, "tensor": 2}]
    assert all(c.mesh.to_dict() == seen[0].mesh.to_dict() for c in seen)
    alone = compressed_data.compressor_config(config.compressor, run, name="compressor")
    assert "mesh" not in alone                         # no mesh given: the block's own default
