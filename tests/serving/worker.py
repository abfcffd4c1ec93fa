"""Serve a model ("toy", or a tiny folder from ``tiny_qwen``, ``tiny_internvl`` ("internvl" in its path),
``tiny_llava_next`` ("llava_next" in its path), ``tiny_llava_onevision`` ("llava_onevision"), ``tiny_gemma4``
("gemma4"), ``tiny_gemma3`` ("gemma3"), ``tiny_glm4v`` ("glm4v") or a renamed toy ("renamed" in its path)) with one vtprune config in this
process; print one JSON line: the answers, their tokens, prompt lengths and each image's kept indices (read
off the served model)."""

import json
import os
import sys


def main():
    method, keep, n = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
    model = sys.argv[4] if len(sys.argv) > 4 else "toy"
    from vllm import SamplingParams

    from vtprune import toy
    from vtprune.serving import LLM, last_kept
    from vtprune.spec import parse_spec

    sys.path.insert(0, os.path.dirname(__file__))
    import tiny_gemma3
    import tiny_gemma4
    import tiny_glm4v
    import tiny_internvl
    import tiny_llava_next
    import tiny_llava_onevision
    import tiny_qwen

    tiny = tiny_internvl if "internvl" in model else tiny_llava_next if "llava_next" in model else \
        tiny_llava_onevision if "llava_onevision" in model else tiny_gemma4 if "gemma4" in model else tiny_gemma3 if "gemma3" in model else \
        tiny_glm4v if "glm4v" in model else tiny_qwen
    like_toy = model == "toy" or "renamed" in model  # the toy under another name (tests/extension_example.py)
    prompt = toy.prompt if like_toy else tiny.prompt
    options = {} if model == "toy" else {"dtype": "bfloat16" if "qwen3_5" in model else "float32", "max_model_len": 512}
    samples = toy.eval_split(n=n)
    names, spec_options = parse_spec(method)  # a method spec: "fastervlm:summary=4;size_bias=true"
    llm = LLM(model, method=names[0], keep=keep, enforce_eager=True, options=spec_options, **options)
    requests = [{"prompt": prompt(s["question"]), "multi_modal_data": {"image": s["image"]}} for s in samples]
    outs = llm.generate(requests, SamplingParams(max_tokens=4, temperature=0.0), use_tqdm=False)
    print("RESULT " + json.dumps({"answers": [o.outputs[0].text for o in outs],
                                  "tokens": [list(o.outputs[0].token_ids) for o in outs],
                                  "prompt_tokens": [len(o.prompt_token_ids) for o in outs],
                                  "kept": last_kept(llm, n)}), flush=True)


if __name__ == "__main__":
    main()
