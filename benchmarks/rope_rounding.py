"""How large is ICL's "update" of the query's own attention scores at layer 0? (docs/metrics.md)

Under RoPE the query's own pre-softmax scores at layer 0 cannot depend on the demonstrations;
what differs between the ICL and ZSL prompts is float rounding of the rotary angles at other
absolute positions. This prints, on tiny-llama-icl and the default task, the largest
|m_ICL - m_ZSL| relative to max |m_ZSL| at layer 0, and the smallest at layer 1 (a real update),
for several numbers of demonstrations. Run: python benchmarks/rope_rounding.py
"""

from __future__ import annotations

import torch

from iclgd_lens import load_model
from iclgd_lens.engine.record import Recorder
from iclgd_lens.tasks import encode_prompts
from iclgd_lens.tasks.mapping import default_task


def relative_update(model, task, k: int, seed: int = 0) -> tuple[int, float, float]:
    """(prompt length, max relative map update at layer 0, min at layer 1) of one episode."""
    episode = task.episodes(k, 1, 8, seed)[0]
    n = len(episode.queries)
    words = [episode.label_words] * n
    icl = encode_prompts(model.tokenizer, task, [episode.demos] * n, list(episode.queries), words)
    zsl = encode_prompts(model.tokenizer, task, [()] * n, list(episode.queries), words)
    recorder = Recorder(model, ["scores"])
    m_icl = recorder.run(icl, "icl")["scores"].double()  # [L, B, H, query tokens]
    m_zsl = recorder.run(zsl, "zsl")["scores"].double()
    width = min(m_icl.shape[-1], m_zsl.shape[-1])
    update = (m_icl[..., :width] - m_zsl[..., :width]).nan_to_num(0).abs().amax(-1)  # [L, B, H]
    scale = m_zsl[..., :width].nan_to_num(0).abs().amax(-1)
    relative = update / scale
    return icl.input_ids.shape[1], float(relative[0].max()), float(relative[1].min())


def main() -> None:
    torch.set_num_threads(1)
    model, task = load_model(), default_task(seed=0)
    print("k  tokens  layer-0 max |dm|/|m|  layer-1 min |dm|/|m|")
    for k in (4, 16, 64):
        length, layer0, layer1 = relative_update(model, task, k)
        print(f"{k:<3}{length:>6}  {layer0:>20.1e}  {layer1:>20.2f}")


if __name__ == "__main__":
    main()
