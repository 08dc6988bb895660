# Environment shared by the batch scripts: sourced, not run.
#
# MODPO_ROOT   the modpo checkout (built with `make setup`; the binary finds libtorch through
#              its rpath into .venv).
# TORCH_LIB    libtorch of the cluster's PyTorch 2.11 if it differs from the build's .venv.
MODPO_ROOT=${MODPO_ROOT:-$HOME/modpo}
MODPO=$MODPO_ROOT/target/release/modpo-trainer
if [ -n "${TORCH_LIB:-}" ]; then
  export LD_LIBRARY_PATH=$TORCH_LIB:${LD_LIBRARY_PATH:-}
fi

# NCCL comes with torch (nvidia-nccl wheel) as libnccl.so.2 only; cudarc opens libnccl.so,
# so a link named that way must be on the library path.
NCCL_DIR=$(ls -d "$MODPO_ROOT"/.venv/lib/python3*/site-packages/nvidia/nccl/lib 2>/dev/null | head -1)
if [ -n "$NCCL_DIR" ]; then
  mkdir -p "$MODPO_ROOT/target/nccl-link"
  ln -sf "$NCCL_DIR/libnccl.so.2" "$MODPO_ROOT/target/nccl-link/libnccl.so"
  export LD_LIBRARY_PATH=$MODPO_ROOT/target/nccl-link:${LD_LIBRARY_PATH:-}
fi

# NCCL: warnings only; set NCCL_DEBUG=INFO to see the rings and transports it picks.
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
# Name the inter-node interface if the default route is not the fast network, e.g.
# export NCCL_SOCKET_IFNAME=ib0        (or eth0); InfiniBand HCAs: export NCCL_IB_HCA=mlx5
# Open MPI only finds the ranks and passes NCCL's id; keep its own traffic off InfiniBand
# verbs it may not be built for:
export OMPI_MCA_btl=${OMPI_MCA_btl:-^openib}
