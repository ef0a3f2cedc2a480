"""
A mutation campaign over the core: plant one small bug at a time in a module (an operator swapped, a constant
changed, a comparison flipped, a condition negated, a statement removed), run the tests chosen for that module,
and count the bugs the tests catch. A surviving mutant is a bug the suite lets through (or an equivalent
program, named with its reason in bench/mutation_equivalent.toml). Issue 31; docs/testing.md reads the results.

    nice -n 19 python -m bench.mutation                                  # every module in MODULES
    nice -n 19 python -m bench.mutation --module nanoforge/optim.py --max-mutants 40 --seed 0

Why a script of ours and not mutmut or cosmic-ray: mutmut 3 begins by running the whole tests/ folder under its
trampolines to learn which tests reach each function (the suite alone takes over ten minutes on this 2-core
machine) and mutates only inside functions in its own copy of the package layout (our model.py sits at the top
level); mutmut 2 and cosmic-ray work with any test command but take no seeded sample of the mutants, and
mutmut 2 edits the working tree in place. Here each module names its own fast tests (MODULES), mutants can be
sampled with a seed, and the tree is a temporary copy, so the checkout is never touched.

Speed: the parent imports torch once and forks a child per mutant, which imports the (mutated) project fresh
from the copy and runs pytest there with -x: a killed mutant usually costs a second or two.
"""

import argparse
import ast
import dataclasses
import importlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EQUIVALENT_FILE = os.path.join(REPO, "bench", "mutation_equivalent.toml")

# The modules under campaign: the tests that cover each (pytest arguments, kept fast: they run once per mutant),
# and optionally the functions or classes to mutate (None: the whole module).
def nodes(file, *tests):
    """pytest arguments for some tests of tests/<file> (all of them when none are named)."""
    return [f"tests/{file}::{t}" for t in tests] or [f"tests/{file}"]


MODULES = {
    "model.py": dict(
        tests=nodes("test_references.py",
                    "test_rotary_keeps_norms_of_every_channel_pair",
                    "test_rotary_angles_are_position_times_base_to_the_minus_2i_over_d",
                    "test_rotary_scores_depend_only_on_relative_position",
                    "test_rotary_start_offsets_positions")
              + nodes("test_model_references.py")
              + nodes("test_model.py",
                      "test_changing_future_tokens_never_changes_past_logits",
                      "test_targets_of_minus_one_are_ignored",
                      "test_sdpa_and_explicit_math_paths_agree")
              + nodes("test_gpt2.py",
                      "test_logits_equal_transformers_at_full_and_cropped_block_size",
                      "test_loss_equals_transformers")
              + nodes("test_architecture.py",
                      "test_each_option_is_causal",
                      "test_each_option_explicit_attention_path_equals_fused_path_with_and_without_cache"),
        warm=["transformers:GPT2LMHeadModel", "tokenizers"]),
    "nanoforge/sampling.py": dict(
        tests=nodes("test_sampling_references.py")
              + nodes("test_references.py",
                      "test_engine_top_k_never_draws_outside_the_k_most_likely",
                      "test_engine_sampling_frequencies_match_softmax_of_logits_over_temperature")
              + nodes("test_generate.py",
                      "test_top_k_and_top_p_sample_only_from_the_allowed_set",
                      "test_sampling_frequencies_follow_the_renormalised_distribution",
                      "test_repetition_penalty_lowers_only_tokens_already_seen",
                      "test_stream_never_splits_a_multibyte_character_and_holds_back_stop_prefixes",
                      "test_lookup_draft_takes_what_followed_the_latest_match",
                      "test_prompt_lookup_refuses_sampling_and_batches",
                      "test_stop_string_and_end_of_text_end_each_sample_separately")),
    "nanoforge/engine.py": dict(
        tests=nodes("test_references.py",
                    "test_engine_sampling_frequencies_match_softmax_of_logits_over_temperature",
                    "test_engine_top_k_never_draws_outside_the_k_most_likely",
                    "test_engine_greedy_takes_the_largest_logit")
              + nodes("test_sampling_references.py")
              + nodes("test_generate.py",
                      "test_generator_samples_vary_with_the_seed_only",
                      "test_seed_fixes_output_and_batch_row_i_equals_single_run_with_seed_plus_i",
                      "test_cached_greedy_equals_reference_across_block_size",
                      "test_repetition_penalty_lowers_only_tokens_already_seen"),
        functions=["Generator.pick_next_tokens", "row_settings", "per_row", "sampling_groups", "token_logprobs",
                   "Batch"]),  # the engine's sampling step and per-row settings (its decoding is model.py's)
    "nanoforge/optim.py": dict(
        tests=nodes("test_references.py",
                    "test_muon_groups_matrices_decay_and_everything_else_does_not",
                    "test_muon_step_with_zero_gradients_decays_only_the_matrices",
                    "test_adamw_groups_and_first_step_follow_adams_definition",
                    "test_muon_update_is_nearly_orthogonal_and_aligned_with_the_svd",
                    "test_optimizers_state_dict_is_torchs_format",
                    "test_newton_schulz_runs_in_bfloat16_only_on_the_device_that_multiplies_it_natively")
              + nodes("test_machine.py",
                      "test_muon_in_bfloat16_is_torchs_and_in_float32_close_to_it",
                      "test_a_torch_muon_checkpoint_resumes_in_ours_step_for_step",
                      "test_muon_orthogonalises_in_bfloat16_only_where_it_is_native")
              + nodes("test_architecture.py",
                      "test_muon_groups_take_their_own_learning_rate_keys",
                      "test_optimizers_state_dict_round_trips_through_a_fresh_pair")),
    "nanoforge/training.py": dict(
        tests=nodes("test_training_references.py")
              + nodes("test_references.py",
                      "test_warmup_rises_linearly_to_the_peak",
                      "test_cosine_schedule_follows_the_formula_after_warmup",
                      "test_constant_schedule_holds_the_peak_after_warmup",
                      "test_wsd_schedule_decays_over_the_last_fraction_of_lr_decay_iters",
                      "test_wsd_decay_never_starts_inside_warmup")
              + nodes("test_architecture.py",
                      "test_wsd_schedule_values_at_its_boundaries"),
        functions=["get_lr", "train_step", "apply_update"]),
    "nanoforge/checkpoint.py": dict(
        tests=nodes("test_checkpoint_references.py")),
    "nanoforge/chat_format.py": dict(
        tests=nodes("test_chat.py")
              + nodes("test_chat_references.py")),
    "nanoforge/multiple_choice.py": dict(
        tests=nodes("test_multiple_choice.py",
                    "test_batched_scores_equal_model_forward_on_our_architectures",
                    "test_accuracy_counts_both_conventions_and_the_interval",
                    "test_an_ending_longer_than_the_context_window_is_one_clear_error",
                    "test_log_likelihoods_and_accuracies_equal_lm_evals_hflm")
              + nodes("test_mc_references.py"),
        warm=["transformers:GPT2LMHeadModel", "tokenizers", "lm_eval.api.instance"]),
    "nanoforge/interventions.py": dict(
        tests=nodes("test_interventions.py",
                    "test_ablating_nothing_reproduces_the_logits_exactly",
                    "test_ablating_a_head_equals_editing_its_slice_by_hand",
                    "test_ablating_a_whole_attention_layer_or_mlp_removes_its_output",
                    "test_ablation_specs_parse_and_are_checked_against_the_model",
                    "test_attribution_parts_sum_to_the_logit",
                    "test_patching_the_whole_clean_stream_restores_all_and_nothing_restores_nothing",
                    "test_head_importance_ranks_the_head_the_task_needs_first")
              + nodes("test_interventions_references.py")),
}

# Modules imported once in the parent, before forking (their import is most of a small test run's time);
# a MODULES entry's "warm" adds its own ("module:attribute" for a lazily imported library).
WARM_IMPORTS = ("torch", "numpy", "safetensors.torch", "tiktoken", "tqdm", "pytest")


# ---------------------------------------------------------------------------------------------------------------
# Mutants

@dataclasses.dataclass
class Mutant:
    module: str
    scope: str  # the enclosing function's qualified name ("<module>" at the top)
    line: int
    line_text: str  # the source line, stripped: names the mutant with its context
    start: tuple  # (line, col) of the replaced source, 1-based line
    end: tuple
    original: str  # the source replaced
    mutated: str  # what replaces it

    occurrence: int = 0  # the n-th mutant of the same key (the same change twice on one line)

    @property
    def key(self):
        """What names a mutant across edits elsewhere in the file (line numbers move; these do not, often)."""
        repeat = f" #{self.occurrence + 1}" if self.occurrence else ""
        return f"{self.scope}: {self.original} -> {self.mutated} in `{self.line_text}`{repeat}"


SWAPS = {ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Div, ast.Div: ast.Mult, ast.FloorDiv: ast.Div,
         ast.Pow: ast.Mult, ast.Mod: ast.FloorDiv, ast.MatMult: ast.Mult}
FLIPS = {ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt, ast.Eq: ast.NotEq,
         ast.NotEq: ast.Eq, ast.In: ast.NotIn, ast.NotIn: ast.In, ast.Is: ast.IsNot, ast.IsNot: ast.Is}


def changed_constant(value):
    """A plausible slip for a numeric constant: off by one for integers, doubled or zeroed for floats."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return 0.0 if value == 1.0 else 1.0 if value == 0.0 else value * 2
    return None


def replacements(node):
    """(original node, replacement source) pairs for one AST node: the one-line bugs a developer could write."""
    out = []
    if isinstance(node, ast.BinOp) and type(node.op) in SWAPS:
        out.append(ast.BinOp(node.left, SWAPS[type(node.op)](), node.right))
        if isinstance(node.op, (ast.Add, ast.Sub)):  # a term forgotten
            out.append(node.left)
    elif isinstance(node, ast.AugAssign) and type(node.op) in SWAPS:
        out.append(ast.AugAssign(node.target, SWAPS[type(node.op)](), node.value))
    elif isinstance(node, ast.Compare) and len(node.ops) == 1 and type(node.ops[0]) in FLIPS:
        out.append(ast.Compare(node.left, [FLIPS[type(node.ops[0])]()], node.comparators))
    elif isinstance(node, ast.BoolOp):
        out.append(ast.BoolOp(ast.Or() if isinstance(node.op, ast.And) else ast.And(), node.values))
    elif isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.Not, ast.USub)):
        out.append(node.operand)
    elif isinstance(node, ast.Constant) and changed_constant(node.value) is not None:
        out.append(ast.Constant(changed_constant(node.value)))
    elif isinstance(node, (ast.If, ast.While)):
        negated = ast.UnaryOp(ast.Not(), node.test)
        return [(node.test, ast.unparse(negated))]
    elif isinstance(node, ast.IfExp):
        return [(node.test, ast.unparse(ast.UnaryOp(ast.Not(), node.test)))]
    elif isinstance(node, (ast.Expr, ast.AugAssign)) and not is_docstring(node):
        out.append("pass")
    if isinstance(node, ast.AugAssign):
        out.append("pass")
    return [(node, r if isinstance(r, str) else ast.unparse(r)) for r in out]


def is_docstring(node):
    return isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)


def skipped(node):
    """Code whose mutants say nothing about the tests: messages, docstrings, asserts guarding the caller."""
    return isinstance(node, (ast.JoinedStr, ast.Raise, ast.Assert, ast.Import, ast.ImportFrom)) or is_docstring(node)


def find_mutants(path, source, functions=None):
    """Every mutant of the module (or of the named functions/classes, "Class.method" or "name")."""
    tree = ast.parse(source)
    lines = source.splitlines(keepends=True)
    mutants = []

    def visit(node, scope, selected):
        if skipped(node):
            return
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            scope = node.name if scope == "<module>" else f"{scope}.{node.name}"
            selected = selected or functions is None or scope in functions
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for child in node.body:  # decorators and default arguments are left alone
                    visit(child, scope, selected)
                return
        if selected and hasattr(node, "lineno") and not isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            for target, replacement in replacements(node):
                start, end = (target.lineno, target.col_offset), (target.end_lineno, target.end_col_offset)
                original = segment(lines, start, end)
                if original.strip() != replacement.strip():
                    mutants.append(Mutant(path, scope, target.lineno, lines[target.lineno - 1].strip(), start, end,
                                          one_line(original), replacement))
        for child in ast.iter_child_nodes(node):
            visit(child, scope, selected)

    visit(tree, "<module>", functions is None)
    seen = {}
    for m in mutants:
        m.occurrence = seen.get(m.key, 0)
        seen[m.key.rsplit(" #", 1)[0] if m.occurrence else m.key] = m.occurrence + 1
    return mutants


def segment(lines, start, end):
    (l1, c1), (l2, c2) = start, end
    if l1 == l2:
        return lines[l1 - 1][c1:c2]
    return lines[l1 - 1][c1:] + "".join(lines[l1 : l2 - 1]) + lines[l2 - 1][:c2]


def one_line(text):
    return " ".join(text.split())


def apply(source, mutant):
    """The module's source with the mutant's segment replaced (everything else, comments included, unchanged)."""
    lines = source.splitlines(keepends=True)
    (l1, c1), (l2, c2) = mutant.start, mutant.end
    before, after = "".join(lines[: l1 - 1]) + lines[l1 - 1][:c1], lines[l2 - 1][c2:] + "".join(lines[l2:])
    replacement = mutant.mutated
    if "\n" in segment(lines, mutant.start, mutant.end) and not replacement.startswith("("):
        replacement = f"({replacement})" if replacement != "pass" else replacement
    return before + replacement + after


def load_equivalents():
    """{(module, key): reason} from bench/mutation_equivalent.toml."""
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib
    with open(EQUIVALENT_FILE, "rb") as f:
        entries = tomllib.load(f).get("equivalent", [])
    return {(e["module"], e["mutant"]): e["reason"] for e in entries}


# ---------------------------------------------------------------------------------------------------------------
# Running the tests against each mutant

def copy_tree(destination):
    """The tracked files of the checkout and the untracked ones it does not ignore (new tests), without caches."""
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                           capture_output=True, text=True, check=True).stdout.split()
    for name in files:
        if os.path.isfile(os.path.join(REPO, name)):
            os.makedirs(os.path.join(destination, os.path.dirname(name)), exist_ok=True)
            shutil.copy2(os.path.join(REPO, name), os.path.join(destination, name))


def run_tests(tree, tests, timeout):
    """Fork, run pytest on tests in the copy; returns 'passed', 'failed' or 'timeout'."""
    pid = os.fork()
    try:
        return wait_for(pid, tree, tests, timeout)
    finally:  # stopped (Ctrl-C, SIGTERM) while a child runs: take its process group down too
        try:
            os.killpg(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError, PermissionError):
            pass


def wait_for(pid, tree, tests, timeout):
    if pid == 0:  # the child: the project is imported here, fresh, from the copy
        try:
            os.setpgid(0, 0)
            os.chdir(tree)
            sys.path.insert(0, tree)
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1)
            os.dup2(devnull, 2)
            import pytest
            code = pytest.main(["-x", "-q", "-p", "no:cacheprovider", "-p", "no:randomly", *tests])
        except BaseException:
            code = 99
        os._exit(int(code))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return "passed" if os.waitstatus_to_exitcode(status) == 0 else "failed"
        time.sleep(0.05)
    return "timeout"  # run_tests kills it


def warm_up(names):
    for name in names:
        module, _, attribute = name.partition(":")
        imported = importlib.import_module(module)
        if attribute:
            getattr(imported, attribute)


def campaign(module, settings, args, equivalents, tree):
    warm_up(settings.get("warm", ()))
    path = os.path.join(tree, module)
    with open(path) as f:
        source = f.read()
    mutants = find_mutants(module, source, settings.get("functions"))
    total = len(mutants)
    carried = []  # with --retest: the earlier outcomes that stand (tests are only ever added, so killed stays killed)
    if args.retest:
        with open(os.path.join(args.retest, result_name(module))) as f:
            earlier = json.load(f)["mutants"]
        survived = {r["key"] for r in earlier if r["outcome"] == "survived"}
        carried = [{**r, "carried": True} for r in earlier if r["outcome"] != "survived"]
        mutants = [m for m in mutants if m.key in survived]
    elif args.max_mutants and total > args.max_mutants:
        mutants = sorted(random.Random(args.seed).sample(mutants, args.max_mutants), key=lambda m: m.start)
    tests = settings["tests"]
    missing = [t for t in tests if not os.path.exists(os.path.join(tree, t.split("::")[0]))]
    tests = [t for t in tests if t not in missing]
    started = time.monotonic()
    baseline = run_tests(tree, tests, 900)  # generous: the unmutated run sets the per-mutant timeout
    if baseline != "passed":
        raise SystemExit(f"{module}: its tests {'fail' if baseline == 'failed' else 'take over 900 s'} without any "
                         f"mutant; fix them first: pytest {' '.join(tests)}")
    baseline = time.monotonic() - started
    timeout = max(args.timeout, 3 * baseline)
    print(f"{module}: {len(mutants)} of {total} mutants, tests {' '.join(tests)} ({baseline:.1f} s unmutated, "
          f"timeout {timeout:.0f} s)", flush=True)
    results = []
    try:
        for i, mutant in enumerate(mutants):
            reason = equivalents.get((module, mutant.key))
            if reason:
                outcome = "equivalent"
            else:
                try:
                    mutated = apply(source, mutant)
                    compile(mutated, path, "exec")
                except SyntaxError:
                    continue  # a replacement that does not parse in context is no mutant
                with open(path, "w") as f:
                    f.write(mutated)
                verdict = run_tests(tree, tests, timeout)
                outcome = {"failed": "killed", "timeout": "killed (timeout)", "passed": "survived"}[verdict]
            results.append({**dataclasses.asdict(mutant), "key": mutant.key, "outcome": outcome,
                            **({"reason": reason} if reason else {})})
            if outcome == "survived" or args.verbose:
                print(f"  [{i + 1}/{len(mutants)}] {outcome}: line {mutant.line}: {mutant.key}", flush=True)
    finally:
        with open(path, "w") as f:
            f.write(source)
    return summarize(module, tests, missing, total, carried + results, time.monotonic() - started)


def result_name(module):
    return module.replace("/", "_").replace(".py", ".json")


def summarize(module, tests, missing, total, results, seconds):
    count = lambda *outcomes: sum(r["outcome"] in outcomes for r in results)
    killed, survived, equivalent = count("killed", "killed (timeout)"), count("survived"), count("equivalent")
    rate = killed / (killed + survived) if killed + survived else None
    return {"module": module, "tests": tests, "missing_tests": missing, "mutants_found": total,
            "mutants_run": len(results), "killed": killed, "survived": survived, "equivalent": equivalent,
            "kill_rate": rate, "seconds": round(seconds, 1), "mutants": results}


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.mutation", description=__doc__.split("\n\n")[0])
    parser.add_argument("--module", action="append", choices=sorted(MODULES),
                        help="a module to mutate (repeatable; default: all of MODULES)")
    parser.add_argument("--max-mutants", type=int, default=0, help="sample at most this many mutants per module "
                        "(0: all)")
    parser.add_argument("--seed", type=int, default=0, help="the sample's seed")
    parser.add_argument("--timeout", type=float, default=60, help="seconds per mutant at least (3x the unmutated "
                        "run's time if longer); a mutant that runs past it counts as killed")
    parser.add_argument("--out", default="out/mutation", help="folder for <module>.json and summary.json")
    parser.add_argument("--retest", metavar="FOLDER", help="run again only the mutants that survived in an earlier "
                        "campaign's --out FOLDER (after adding tests for them); its other outcomes are carried over")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    parser.add_argument("--verbose", action="store_true", help="print every mutant's outcome, not only survivors")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwinds through run_tests, which kills the child
    modules = args.module or list(MODULES)
    equivalents = load_equivalents()
    if args.list:
        for module in modules:
            with open(os.path.join(REPO, module)) as f:
                for m in find_mutants(module, f.read(), MODULES[module].get("functions")):
                    print(f"{module}:{m.line}: {m.key}")
        return
    warm_up(WARM_IMPORTS)
    import torch
    torch.set_num_threads(1)  # a shared machine: one core per campaign
    # Mutants of one size written within a second would share a stale .pyc (it is keyed by mtime in seconds).
    sys.dont_write_bytecode = True
    os.environ["PYTHONDONTWRITEBYTECODE"] = "1"  # and the commands the tests start
    os.makedirs(args.out, exist_ok=True)
    summary = []
    with tempfile.TemporaryDirectory(prefix="mutation-") as tree:
        copy_tree(tree)
        for module in modules:
            result = campaign(module, MODULES[module], args, equivalents, tree)
            with open(os.path.join(args.out, result_name(module)), "w") as f:
                json.dump(result, f, indent=1)
            rate = "n/a" if result["kill_rate"] is None else f"{result['kill_rate']:.0%}"
            print(f"{module}: {result['killed']} killed, {result['survived']} survived, {result['equivalent']} "
                  f"equivalent of {result['mutants_run']} run ({result['mutants_found']} found): {rate} killed, "
                  f"{result['seconds']:.0f} s", flush=True)
            summary.append({k: v for k, v in result.items() if k != "mutants"})
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump({"seed": args.seed, "max_mutants": args.max_mutants, "modules": summary}, f, indent=1)


if __name__ == "__main__":
    main()
