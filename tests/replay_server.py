"""TEST-ONLY: an mmx server whose "model" replays scripted completions.

The engine interface (generate / finish_sequence / abort / stats, in token ids) is the real one's; only the token
source is a script:
the completion for a prompt is the script entry whose key occurs latest in the prompt text. Every prompt is appended to a
log file so tests can check what the server rendered (interleaved thinking, tool results).

    python -m tests.replay_server --script script.json --log prompts.log --tokenizer DIR --port 8123
"""

from __future__ import annotations

import argparse
import asyncio
import json

from mmx.chat import Tokenizer
from mmx.engine.async_engine import EngineStats
from mmx.engine.outputs import CompletionOutput, RequestOutput


class ReplayEngine:
    def __init__(self, tokenizer: Tokenizer, script: dict[str, str], log_path: str, chunk: int = 2):
        self.tokenizer = tokenizer
        self.script = script
        self.log_path = log_path
        self.chunk = chunk
        self.stats = EngineStats()
        self.alive = True

    def completion_for(self, prompt: str) -> str:
        """The entry whose key occurs latest in the prompt (the turn being answered)."""
        hits = [(prompt.rfind(key), text) for key, text in self.script.items() if key in prompt]
        return max(hits)[1] if hits else "(no script entry)"

    def generate(self, prompt_ids, params, request_id=None):
        prompt = self.tokenizer.decode(prompt_ids, skip_special_tokens=False)
        with open(self.log_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(prompt) + "\n")
        return self._replay(list(prompt_ids), self.tokenizer.encode(self.completion_for(prompt)), params, request_id)

    async def _replay(self, prompt_ids, ids, params, request_id):
        limit = params.max_tokens or len(ids)
        out_ids: list[int] = []
        for start in range(0, min(len(ids), limit), self.chunk):
            piece = ids[start : min(start + self.chunk, limit)]
            out_ids += piece
            done = len(out_ids) >= min(len(ids), limit)
            reason = ("length" if limit < len(ids) else "stop") if done else None
            sample = CompletionOutput(0, "", list(out_ids), reason, new_token_ids=piece)
            yield RequestOutput(request_id, None, prompt_ids, [sample], done)
            await asyncio.sleep(0)

    def finish_sequence(self, request_id: str, index: int, stop_reason=None) -> None:
        pass

    def abort(self, request_id: str) -> None:
        pass


def main() -> None:
    import uvicorn

    from mmx.chat.formats import ChatSetup, get_format
    from mmx.serve import ServerState, build_app

    parser = argparse.ArgumentParser()
    parser.add_argument("--script", required=True)
    parser.add_argument("--log", required=True)
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--style", default="minimax_m2")
    args = parser.parse_args()
    tokenizer = Tokenizer.from_pretrained(args.tokenizer)
    with open(args.script, encoding="utf-8") as f:
        script = json.load(f)
    chat_format = get_format(args.style)
    state = ServerState(
        engine=ReplayEngine(tokenizer, script, args.log),
        tokenizer=tokenizer,
        chat=ChatSetup(chat_format.builtin_template, chat_format),
        model_name="replay",
        model_path="replay",
        max_model_len=4096,
    )
    uvicorn.run(build_app(state), host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
