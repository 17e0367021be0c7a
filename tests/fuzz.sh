#!/usr/bin/env bash
# Fuzzing (tests/fuzz, cargo-fuzz + libFuzzer): every target must survive its corpus and fresh
# mutations without a panic, an overflow or a hang.
#
#   tests/fuzz.sh                 CI: each target for FUZZ_SECONDS (default 15) s, one job
#   tests/fuzz.sh --long          development: each target for 1,000,000 inputs; new inputs go
#                                 into tests/fuzz/corpus/<target> (minimise with --cmin after)
#   tests/fuzz.sh --cmin          minimise the committed corpora
#   tests/fuzz.sh [...] TARGET..  only these targets
#
# A crash leaves its input in tests/fuzz/artifacts/<target>/ and exits non-zero; reproduce with
# `cargo fuzz run --fuzz-dir tests/fuzz -s none TARGET tests/fuzz/artifacts/TARGET/crash-...`.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -d "$HOME/.cargo/bin" ] && export PATH="$HOME/.cargo/bin:$PATH"

mode=ci
targets=()
for a in "$@"; do
    case "$a" in
        --long) mode=long ;;
        --cmin) mode=cmin ;;
        -*) echo "usage: $0 [--long|--cmin] [TARGET...]" >&2; exit 2 ;;
        *) targets+=("$a") ;;
    esac
done

if ! command -v cargo-fuzz >/dev/null; then
    echo "fuzz: installing cargo-fuzz" >&2
    cargo install cargo-fuzz --locked
fi
# cargo-fuzz builds on stable as it is without a sanitizer (no RUSTC_BOOTSTRAP: setting it would
# also change every fingerprint and rebuild all).
# No sanitizer: the product is safe Rust; libFuzzer still finds panics, overflows (the build has
# overflow checks and debug assertions on) and hangs.
dir=(--fuzz-dir tests/fuzz)
opts=("${dir[@]}" -s none)

[ ${#targets[@]} -gt 0 ] || mapfile -t targets < <(cargo fuzz list "${dir[@]}")

start=$(date +%s)
# Every target at once (one cargo build); `run` below finds them built.
cargo fuzz build "${opts[@]}" >&2
echo "fuzz: built in $(( $(date +%s) - start )) s" >&2

secs=${FUZZ_SECONDS:-15}
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
for t in "${targets[@]}"; do
    corpus=tests/fuzz/corpus/$t
    mkdir -p "$corpus"
    case $mode in
        ci)
            # New inputs go to a scratch dir: CI reads the committed corpus, never grows it.
            mkdir -p "$scratch/$t"
            cargo fuzz run "${opts[@]}" "$t" "$scratch/$t" "$corpus" -- \
                -max_total_time="$secs" -timeout=10 -max_len=16384 -print_final_stats=1 \
                2>"$scratch/$t.log" || { tail -n 40 "$scratch/$t.log" >&2; exit 1; }
            ;;
        long)
            cargo fuzz run "${opts[@]}" "$t" "$corpus" -- \
                -runs=1000000 -timeout=10 -max_len=16384 -print_final_stats=1 \
                2>"$scratch/$t.log" || { tail -n 40 "$scratch/$t.log" >&2; exit 1; }
            ;;
        cmin)
            cargo fuzz cmin "${opts[@]}" "$t" "$corpus" -- -max_len=16384 \
                2>"$scratch/$t.log" || { tail -n 40 "$scratch/$t.log" >&2; exit 1; }
            echo "fuzz: $t corpus: $(ls "$corpus" | wc -l) files" >&2
            continue
            ;;
    esac
    runs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$scratch/$t.log" | grep -o '[0-9]*$')
    rate=$(grep -o 'stat::average_exec_per_sec: *[0-9]*' "$scratch/$t.log" | grep -o '[0-9]*$')
    echo "fuzz: $t ok: ${runs:-?} inputs, ${rate:-?} exec/s" >&2
done
echo "fuzz: done in $(( $(date +%s) - start )) s" >&2
