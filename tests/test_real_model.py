"""Real-model check (slow): SmolLM2-135M through the whole quantize → save → load → eval path."""

import pytest
import torch

from qtool.assets import qtool_home

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    if not (qtool_home() / "models" / "smollm2-135m" / "model.safetensors").is_file():
        pytest.skip("SmolLM2 not fetched (run `qtool assets fetch`)")
    from qtool.calib.data import load_text
    from qtool.eval.ppl import tokenize_text
    from qtool.io.hf import load_model

    model, tok = load_model("smollm2-135m")
    ids = tokenize_text(tok, load_text("bundled")[1])
    return model, tok, ids


def test_rtn_w4_g64_packed_checkpoint_above_fp(smollm2, tmp_path):
    from qtool import api, pipeline
    from qtool.eval.ppl import perplexity
    from qtool.recipe import load_recipe

    model, tok, ids = smollm2
    fp = perplexity(model, ids, seqlen=2048, max_windows=2).ppl
    r = load_recipe(["recipes/rtn-w4a16.yaml"], [f"output.dir={tmp_path / 'rtn'}"])
    res = pipeline.run_quantize(pipeline.plan(r))
    fake = perplexity(res.model, ids, seqlen=2048, max_windows=2).ppl
    del res.model
    qmodel, _, info = api.load_target(str(tmp_path / "rtn"), "reference")
    packed = perplexity(qmodel, ids, seqlen=2048, max_windows=2).ppl
    assert info["layout"] == "quick-w4a16@1"
    assert 8 < fp < 40
    assert fp * 1.01 < fake < fp * 3, (fp, fake)
    # the packed checkpoint through the runtime modules is the fake-quant model
    assert abs(packed - fake) / fake < 1e-3, (packed, fake)
