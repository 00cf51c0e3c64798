"""The naive baseline: plain `transformers` generate + TextIteratorStreamer behind gRPC.

    python -m bench.naive_server --hf models/tweetgpt/1/hf --port 50070

What one writes first when asked to stream a Hugging Face model over the network: a
thread per request (grpc's sync server with a thread pool), each running
`model.generate(..., streamer=TextIteratorStreamer)` on its own thread, the handler
forwarding the streamer's text. No batching across requests: concurrent requests share
the CPU through torch's threads. It speaks headrace's own GenerateStream RPC so the same
load generator drives both servers; a cancelled call stops its generate at the next token
(a StoppingCriteria that reads the call's state), so abandoned streams free the CPU.
"""

from __future__ import annotations

import argparse
import threading
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
from headrace.v1 import inference_pb2 as pb
from headrace.v1 import inference_pb2_grpc as pbg


def load(hf_dir: Path) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

    model = AutoModelForCausalLM.from_pretrained(str(hf_dir)).eval()
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(hf_dir))
    except (OSError, ValueError):
        tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(hf_dir / "tokenizer.json"))
    return model, tokenizer


def streamer_class() -> type:
    from transformers import TextIteratorStreamer

    class TokenTextStreamer(TextIteratorStreamer):
        """TextIteratorStreamer whose queue items are (text, new token ids): the stock
        streamer's text, plus the ids so the client can count tokens."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._new: list[int] = []

        def put(self, value: Any) -> None:
            if not (self.skip_prompt and self.next_tokens_are_prompt):
                self._new = [int(t) for t in value.reshape(-1).tolist()]
            super().put(value)

        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            self.text_queue.put((text, self._new), timeout=self.timeout)
            self._new = []
            if stream_end:
                self.text_queue.put(self.stop_signal, timeout=self.timeout)

    return TokenTextStreamer


class NaiveInference(pbg.InferenceServicer):
    def __init__(self, model: Any, tokenizer: Any, name: str) -> None:
        import torch
        from transformers import StoppingCriteria

        self.torch = torch
        self.model, self.tokenizer, self.name = model, tokenizer, name
        self.streamer_cls = streamer_class()

        class Cancelled(StoppingCriteria):
            def __init__(self, context: grpc.ServicerContext) -> None:
                self.context = context

            def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> bool:
                return not self.context.is_active()

        self.cancelled_cls = Cancelled

    def GenerateStream(self, request: pb.GenerateRequest, context: grpc.ServicerContext) -> Any:
        from transformers import StoppingCriteriaList

        ids = self.tokenizer(request.prompt, return_tensors="pt")["input_ids"]
        streamer = self.streamer_cls(self.tokenizer, skip_prompt=True, timeout=120)
        eos = self.model.config.eos_token_id
        kwargs = {
            "input_ids": ids,
            "attention_mask": self.torch.ones_like(ids),
            "max_new_tokens": request.max_new_tokens or 64,
            # temperature 0 (unset) is greedy, as in headrace
            "do_sample": request.sampling.temperature > 0,
            "temperature": request.sampling.temperature or None,
            "top_k": request.sampling.top_k or None,
            "streamer": streamer,
            "pad_token_id": eos,
            "stopping_criteria": StoppingCriteriaList([self.cancelled_cls(context)]),
        }
        if request.sampling.ignore_eos:  # as headrace: run to max_new_tokens
            kwargs["min_new_tokens"] = kwargs["max_new_tokens"]
        thread = threading.Thread(target=self._generate, kwargs=kwargs, daemon=True)
        thread.start()
        n = 0
        for text, token_ids in streamer:
            n += len(token_ids)
            if text or token_ids:
                yield pb.GenerateChunk(
                    text=text, token_ids=token_ids, request_id=request.request_id
                )
        thread.join()
        yield pb.GenerateChunk(
            finish_reason=pb.LENGTH, usage=pb.Usage(prompt_tokens=ids.shape[1], completion_tokens=n)
        )

    def _generate(self, **kwargs: Any) -> None:
        with self.torch.inference_mode():
            self.model.generate(**kwargs)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--hf", type=Path, required=True, help="the HF checkpoint folder")
    p.add_argument("--name", default="tweetgpt")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--workers", type=int, default=64, help="request threads")
    a = p.parse_args(argv)
    model, tokenizer = load(a.hf)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=a.workers))
    pbg.add_InferenceServicer_to_server(NaiveInference(model, tokenizer, a.name), server)
    server.add_insecure_port(f"127.0.0.1:{a.port}")
    server.start()
    print(f"naive server on 127.0.0.1:{a.port}", flush=True)
    server.wait_for_termination()


if __name__ == "__main__":
    main()
