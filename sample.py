"""
Generate text from a checkpoint. The checkpoint carries the model's config and tokenizer,
so nothing else is needed.

    python sample.py --ckpt out/quickstart --prompt "def "
    python sample.py --init-from gpt2 --prompt "Hello, I'm a language model,"

--ckpt takes a run directory (best.safetensors is used when present, else latest.safetensors)
or a checkpoint file. Each sample is printed after its prompt and followed by a line of 40
dashes; the samples of a batch print one after another, the current one streaming as its
tokens arrive (--no-stream prints each sample whole). --interactive reads one prompt per
line from stdin and prints the continuations (without the prompt) until end of input.
--init-from samples straight from pretrained GPT-2 weights (a model name found in the Hugging
Face cache, or a Hugging Face GPT-2 directory).

--sae FILE --steer F=SCALE (repeatable) steers with sparse-autoencoder features (features.py train): SCALE times
feature F's decoder direction is added to the SAE's site at every position while generating (docs/features.md).

--chat talks with a model fine-tuned on chat data (its tokenizer has the chat tokens): each line of
stdin is a user message, and the reply streams back, ending at <|assistant_end|>. The conversation
so far is the context of each reply; when it no longer fits in block_size (with room for the
reply), its oldest turns are dropped, which is said once. "/clear" starts a new conversation; end
of input ends it. --chat --prompt TEXT answers one message and exits. --system TEXT starts the
conversation with a system message. Notes go to stderr, replies to stdout; one reply per message
(--num-samples does not apply). A model fine-tuned with tool calls (its tokenizer has the tool tokens) may call
the calculator: the engine answers each call, and the reply shows it as
<|python_start|>347+85<|python_end|><|output_start|>432<|output_end|> before the answer.
"""

import re
import sys

import torch

from nanoforge import cli, features, loading
from nanoforge.chat_format import ChatError, fit_to_context, require_chat_tokens
from nanoforge.config import ConfigError
from nanoforge.device import resolve_device, resolve_dtype
from nanoforge.engine import Generator
from nanoforge.machine import probe
from nanoforge.sampling import SettingError, check_lookup
from nanoforge.tokenizer import TokenizerError, has_tools
from nanoforge.tools import final_text, reply_parts


def unescape(text):
    """Backslash escapes typed in a shell (--stop "\\n\\n") -> the characters they name."""
    names = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\"}
    return re.sub(r"\\(.)", lambda m: names.get(m.group(1), m.group(0)), text)


def read_prompts():
    """Lines of stdin until end of input, asking with "> " on a terminal."""
    while True:
        try:
            yield input("> " if sys.stdin.isatty() else "")
        except EOFError:
            return


def write(text):
    sys.stdout.write(text)
    sys.stdout.flush()


class SamplePrinter:
    """Prints a batch's samples in order, each after its heading (the prompt) and followed by a
    line of dashes. With stream, the sample whose turn it is prints as its text arrives; the
    others are kept until their turn (they are generated at the same time, in one batch)."""

    def __init__(self, n, heading, stream):
        self.parts = [[heading] for _ in range(n)]
        self.done = [False] * n
        self.turn = 0
        self.stream = stream

    def __call__(self, row, text, done):
        self.parts[row].append(text)
        self.done[row] = done
        while self.stream and self.turn < len(self.parts):
            write("".join(self.parts[self.turn]))
            self.parts[self.turn] = []
            if not self.done[self.turn]:
                break
            write("\n" + "-" * 40 + "\n")
            self.turn += 1

    def finish(self):
        if not self.stream:
            for parts in self.parts:
                write("".join(parts) + "\n" + "-" * 40 + "\n")


def note(text):
    print(text, file=sys.stderr, flush=True)


def chat_session(generator, lines, system, settings, interactive):
    """A conversation: each line is a user message; each reply streams to stdout, one line after it. A model with
    the tool tokens may call the calculator: the call and its output stream between their tool tokens."""
    use_tools = has_tools(generator.tokenizer)
    start = [{"role": "system", "content": system}] if system else []
    messages, said_dropping = list(start), False
    for line in lines:
        if line.strip() == "/clear":
            messages, said_dropping = list(start), False
            note("(new conversation)")
            continue
        if not line.strip():
            continue
        try:
            messages, dropped = fit_to_context(generator.tokenizer, messages + [{"role": "user", "content": line}],
                                               generator.config.block_size, settings["max_new_tokens"])
        except ChatError as e:
            if not interactive:
                raise
            note(f"sample.py: error: {e}")  # the message is not kept; the conversation goes on
            continue
        if dropped and not said_dropping:
            note(f"(the conversation no longer fits in the model's context of {generator.config.block_size} "
                 "tokens: its oldest turns are dropped from now on)")
            said_dropping = True
        reply = generator.chat(messages, on_text=lambda row, text, done: write(text), tools=use_tools, **settings)
        write("\n")
        parts = reply_parts(generator.tokenizer, reply.ids)  # the calls and their outputs stay in the history
        if final_text(parts).strip():
            messages.append({"role": "assistant", "content": parts if use_tools else reply.text})
        else:  # an empty turn breaks the chat format: leave the exchange out
            messages.pop()
            note("(empty reply: this exchange is left out of the conversation)")


def arguments():
    parser = cli.parser(__doc__)
    cli.add_model_arguments(parser)
    prompt = parser.add_mutually_exclusive_group()
    prompt.add_argument("--prompt", help="text to continue (default: a newline, or end-of-text for byte/BPE)")
    prompt.add_argument("--prompt-file", metavar="FILE", help="file whose text to continue")
    prompt.add_argument("--interactive", action="store_true", help="read prompts from stdin, one per line")
    parser.add_argument("--chat", action="store_true", help="talk with a chat model: one message per line of "
                        "stdin (/clear starts over), or one turn with --prompt")
    parser.add_argument("--system", help="with --chat: a system message that starts the conversation")
    parser.add_argument("--num-samples", type=int, default=3, metavar="N", help="samples per prompt, generated as "
                        "one batch")
    parser.add_argument("--max-new-tokens", type=int, default=500, metavar="N")
    parser.add_argument("--temperature", type=float, default=0.8, help="0 picks the most likely token (greedy)")
    parser.add_argument("--top-k", type=int, default=200, metavar="K", help="sample among the k most likely "
                        "tokens (0: all)")
    parser.add_argument("--top-p", type=float, default=1.0, metavar="P", help="sample from the smallest set of "
                        "tokens whose probabilities sum to at least p (nucleus sampling; 1: all)")
    parser.add_argument("--repetition-penalty", type=float, default=1.0, help="above 1 makes tokens already "
                        "in the text less likely (1: off)")
    parser.add_argument("--stop", action="append", default=[], help="end a sample at this text (not printed); "
                        "repeatable; backslash escapes such as \\n work")
    parser.add_argument("--ignore-eot", action="store_true", help="go on past the end-of-text token")
    parser.add_argument("--slide", type=int, default=None, metavar="N", help="past block_size, drop this many "
                        "tokens at a time and re-prefill (default block_size / 4; 1: every step sees a full window, "
                        "exactly like GPT.generate, at the reference's cost)")
    parser.add_argument("--seed", type=int, default=1337, help="sample i of a batch uses seed + i")
    parser.add_argument("--no-stream", action="store_true", help="print each sample whole when it is done")
    parser.add_argument("--compile", action="store_true", help="torch.compile the decode step")
    parser.add_argument("--quantize", choices=["int8"], default=None, help="int8: weight-only int8 matrices with "
                        "one scale per output channel, decoded in bfloat16 (a quarter of float32's bytes per token)")
    parser.add_argument("--lookup", type=int, default=0, metavar="K", help="with --temperature 0 and one sample: "
                        "draft up to K tokens per step from earlier text and check them in one pass (prompt lookup: "
                        "the same output as plain greedy decoding, faster on repetitive text; 0: off)")
    parser.add_argument("--sae", metavar="FILE", help="an SAE file (features.py train) whose features --steer adds")
    parser.add_argument("--steer", action="append", default=[], metavar="F=SCALE", help="with --sae: add SCALE x "
                        "feature F's direction at the SAE's site while generating; repeatable")
    cli.add_device_arguments(parser)
    return parser


def check(args):
    """The flag combinations that cannot work, refused before the model loads."""
    if args.num_samples < 1:
        raise ConfigError(f"--num-samples must be at least 1, got {args.num_samples}")
    if args.chat and (args.interactive or args.prompt_file):
        raise ConfigError("--chat reads messages from stdin (or one from --prompt): drop --interactive/--prompt-file")
    if args.system is not None and not args.chat:
        raise ConfigError("--system only applies with --chat")
    # a chat turn is one prompt
    check_lookup(args.lookup, args.temperature, args.repetition_penalty, 1 if args.chat else args.num_samples)
    if bool(args.sae) != bool(args.steer):
        raise ConfigError("--sae and --steer go together: --sae FILE --steer FEATURE=SCALE")
    if args.quantize and args.dtype not in ("auto", "float32"):
        raise ConfigError(f"--quantize int8 decodes in bfloat16 from the checkpoint's own weights: drop --dtype "
                          f"{args.dtype}")


def sample(args, generator, settings):
    """Print the continuations of the prompts args names (or of stdin's lines with --interactive)."""
    if args.interactive:
        prompts = read_prompts()
    elif args.prompt_file:
        with open(args.prompt_file, encoding="utf-8") as f:
            prompts = [f.read()]
    else:
        prompts = [args.prompt or ""]
    tokenizer = generator.tokenizer
    machine = probe().summary()  # said once, before the first generation: a bad prompt stays one line
    for text in prompts:
        try:
            ids = generator.encode(text)  # an empty prompt becomes end-of-text, or a newline
        except TokenizerError as e:
            if not args.interactive:
                raise
            print(f"sample.py: error: {e}", file=sys.stderr)  # one bad line does not end the session
            continue
        heading = "" if args.interactive else tokenizer.decode([i for i in ids if i != tokenizer.eot_id])
        printer = SamplePrinter(args.num_samples, heading, stream=not args.no_stream)
        if machine:
            print(machine, file=sys.stderr)
            machine = None
        generator.generate([ids] * args.num_samples, on_text=printer, **settings)
        printer.finish()


def steering_of(args, model):
    """(site, sae, [(feature, scale)]) for --sae/--steer, or None; an SAE of another model is refused."""
    if not args.sae:
        return None
    saved = features.load(args.sae, model=model, device=next(model.parameters()).device)
    return saved.site, saved.sae, features.parse_steering(args.steer, saved.sae.cfg.latents)


@cli.command
def main(argv=None):
    args = arguments().parse_args(argv)
    settings = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                    top_p=args.top_p, repetition_penalty=args.repetition_penalty, seed=args.seed,
                    stop=[unescape(s) for s in args.stop], stop_at_eot=not args.ignore_eot, slide=args.slide,
                    lookup=args.lookup)
    try:
        check(args)
        device = resolve_device(args.device)
        dtype = torch.float32 if args.quantize else resolve_dtype(args.dtype, device.type)
        model, tokenizer = loading.load_model_from_args(args, device)
        if args.chat:
            require_chat_tokens(tokenizer)
        steering = steering_of(args, model)  # read before the dtype changes the weights the SAE file names
        generator = Generator(model.to(dtype), tokenizer, compile=args.compile, quantize=args.quantize)
        if steering:
            features.steer(generator.decoder, *steering)  # a hook on the decoder's block: the engine is unchanged
        del model  # the generator decodes with its own copy of the matrices: let the originals go
        if args.chat:
            print(probe().summary(), file=sys.stderr)  # once set up: a bad flag or prompt stays one line
            lines = [args.prompt] if args.prompt is not None else read_prompts()
            return chat_session(generator, lines, args.system, settings, interactive=args.prompt is None)
        sample(args, generator, settings)
    except SettingError as e:  # named as the flag that set it
        raise ConfigError(f"--{e.name.replace('_', '-')} must be {e.expected}, got {e.value}") from None


if __name__ == "__main__":
    main()
