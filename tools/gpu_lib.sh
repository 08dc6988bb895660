# Sourced by tools/gpu_nccl_check.sh and tools/gpu_bench.sh (not run on its own): bundling a
# release binary with the Open MPI libraries it links, and, on the GPU machine (torch at
# /opt/torch/.venv, no Rust toolchain, maybe no Open MPI), finding torch's lib/ and lending
# the bundled libraries the machine lacks. Callers set ROOT (the repository root).

fail_env() { echo "FAIL (environment): $*"; exit 2; }

# bundle_binary PACKAGE BIN DIR: build BIN of PACKAGE (release), copy it stripped to DIR and
# the libraries it links to DIR/lib, except glibc, libstdc++ and torch's (the machine's own).
bundle_binary() {
    local package=$1 bin=$2 dir=$3
    (cd "$ROOT" && cargo build --release -p "$package" --bin "$bin")
    rm -rf "$dir" && mkdir -p "$dir/lib"
    cp "$ROOT/target/release/$bin" "$dir/"
    strip --strip-debug "$dir/$bin"
    ldd "$dir/$bin" | awk '$3 ~ /^\// { print $3 }' |
        grep -Ev '/(libc|libm|libdl|librt|libpthread|libutil|libstdc\+\+|libgcc_s|ld-linux[^/]*)\.so' |
        grep -v 'site-packages' |
        while read -r lib; do cp -L "$lib" "$dir/lib/"; done
}

# find_torch_lib: sets TORCH_LIB_DIR to torch's lib/ directory (TORCH_LIB, else /opt/torch's
# venv); a global rather than output, so that fail_env's message is not swallowed.
find_torch_lib() {
    TORCH_LIB_DIR=${TORCH_LIB:-}
    if [ -z "$TORCH_LIB_DIR" ]; then
        TORCH_LIB_DIR=$(ls -d /opt/torch/.venv/lib/python3*/site-packages/torch/lib 2>/dev/null | head -n1 || true)
    fi
    [ -d "$TORCH_LIB_DIR" ] || fail_env "torch lib/ not found (set TORCH_LIB)"
}

# lend_bundled_libs BIN DIR LINK_DIR: link into LINK_DIR (which must be on LD_LIBRARY_PATH)
# each library BIN cannot find that the bundle DIR/lib has, a few rounds for deps of deps;
# fails if any is still missing.
lend_bundled_libs() {
    local bin=$1 dir=$2 link_dir=$3
    for _ in 1 2 3 4; do
        local missing
        missing=$(ldd "$bin" | awk '/not found/ { print $1 }')
        [ -n "$missing" ] || break
        for lib in $missing; do
            [ -e "$dir/lib/$lib" ] || fail_env "$lib is missing and not in the bundle"
            ln -sf "$dir/lib/$lib" "$link_dir/$lib"
        done
    done
    if ldd "$bin" | grep -q 'not found'; then
        ldd "$bin" | grep 'not found'
        fail_env "libraries still missing"
    fi
}
