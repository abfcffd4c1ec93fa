"""Serve the toy model with one vtprune config in this process; print one JSON line: the answers, prompt
lengths and each image's kept indices (read off the served model)."""

import json
import sys


def main():
    method, keep, n = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
    from vllm import SamplingParams

    from vtprune import toy
    from vtprune.serving import LLM, last_kept

    samples = toy.eval_split(n=n)
    llm = LLM("toy", method=method, keep=keep, enforce_eager=True)
    requests = [{"prompt": toy.prompt(s["question"]), "multi_modal_data": {"image": s["image"]}} for s in samples]
    outs = llm.generate(requests, SamplingParams(max_tokens=4, temperature=0.0), use_tqdm=False)
    print("RESULT " + json.dumps({"answers": [o.outputs[0].text for o in outs],
                                  "tokens": [list(o.outputs[0].token_ids) for o in outs],
                                  "prompt_tokens": [len(o.prompt_token_ids) for o in outs],
                                  "kept": last_kept(llm, n)}), flush=True)


if __name__ == "__main__":
    main()
