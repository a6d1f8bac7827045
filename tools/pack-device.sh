#!/usr/bin/env bash
# Packs a CUDA build of lrllm for the device machine, which has the NVIDIA driver, CUDA 13 and PyTorch but not
# Open MPI, HDF5, OpenBLAS, Boost or PCRE2. Carry OUT_DIR to the device (it is git-ignored) and there, from the
# repo root: `source .device/env.sh`, then `lrllm ...`, `test_gpu` or `mpirun -np 2 lrllm ...`.
# usage: tools/pack-device.sh [BUILD_DIR] [OUT_DIR]   (defaults: build, .device)
#
# OUT_DIR holds env.sh, bin/ and payload.tar.xz. The payload (about 90 MiB unpacked, most of it OpenBLAS and
# HDF5's libcurl chain) would not fit in the 64 MiB a device call carries; xz brings it to about a fifth, and
# the first `source env.sh` on a machine unpacks it (with python3's tarfile: no xz program needed) into
# ${TMPDIR:-/tmp}/lrllm-pack-HASH, outside the carried folder:
#   libexec/   lrllm, test_gpu (when BUILD_DIR/tests/gpu exists), orterun, orted: stripped
#   lib/       every shared library they need that the device does not provide; lib/openmpi/ Open MPI's MCA
#              components (their libraries are in lib/ too), lib/pmix/ PMIx's
#   share/openmpi/, share/pmix/, etc/openmpi/   Open MPI's and PMIx's help texts and configuration
#   tokenizer/ GPT-2's encoder.json and vocab.bpe (finetuning reads them)
# bin/ holds one wrapper per program (lrllm, test_gpu, mpirun, orted) that puts the pack's libraries on
# LD_LIBRARY_PATH for that program and its children alone: exported into the shell they would replace the
# device's own libstdc++, zlib, OpenSSL... in python3 and PyTorch too.
#
# Not packed, because the device provides them and they must match it:
#   - glibc (libc, libm, libdl, libpthread, librt, libresolv, the dynamic loader): tied to the device's loader.
#     env.sh checks that the device's glibc is at least the newest version the packed files ask for.
#   - libgcc_s: every system has one, and newer ones keep the old symbols.
#   - the driver (libcuda) and CUDA's libcudart, libcublas, libcublasLt and libnccl: the device has CUDA 13 (its
#     toolkit, and PyTorch's cu130 wheels), the major version of this build, and their sonames carry that
#     version (libcublas.so.13), so a device with another CUDA fails in env.sh with one line rather than at
#     run time. They could not travel anyway: libcublasLt alone is over 500 MiB, NCCL over 200 MiB.
# libstdc++ is packed: lrllm needs the GLIBCXX symbols of the GCC that built it, and the device image's may be
# older; the wrappers keep it to the packed programs.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

BUILD=${1:-build}
OUT=${2:-.device}
CARRY_LIMIT_MIB=64  # what one device call carries: working tree and carried folders together

die() {
  echo "pack-device: $*" >&2
  exit 1
}

[[ -x "$BUILD/lrllm" ]] || die "$BUILD/lrllm is missing: build first (make all)"
# (grep without -q reads all its input: an early exit would fail the pipeline with SIGPIPE under pipefail.)
readelf -d "$BUILD/lrllm" | grep 'NEEDED.*\[libcudart\.so' >/dev/null ||
  die "$BUILD/lrllm is not a CUDA build (it does not link libcudart): build it where nvcc and CUDA's libraries are"
# Without sm_90 machine code an H100/H200 would have to JIT-compile PTX at every start, if the build has any.
cuobjdump=$(command -v cuobjdump || echo /usr/local/cuda/bin/cuobjdump)
if [[ -x "$cuobjdump" ]] && ! "$cuobjdump" --list-elf "$BUILD/lrllm" 2>/dev/null | grep 'sm_90' >/dev/null; then
  die "$BUILD/lrllm has no sm_90 code for the H100/H200: rebuild with CUDA_ARCH=sm_90"
fi
command -v ompi_info >/dev/null || die "ompi_info is missing: Open MPI's runtime cannot be packed (make deps)"
command -v xz >/dev/null || die "xz is missing: the payload cannot be compressed (apt-get install xz-utils)"
case "$OUT" in
  "" | / | . | ./ | .. | "$PWD") die "refusing OUT_DIR '$OUT'" ;;
esac
if [[ -e "$OUT" && ! -f "$OUT/env.sh" && -n "$(ls -A "$OUT")" ]]; then
  die "$OUT exists and is not a pack (no env.sh): remove it or name another OUT_DIR"
fi

ompi_path() { ompi_info --path "$1" | awk -F': ' '{print $2}'; }
ompi_bindir=$(ompi_path bindir)
ompi_pkglibdir=$(ompi_path pkglibdir)
# Debian's Open MPI uses an external PMIx, installed under a prefix of its own (…/pmix2).
pmix_lib=$(ldd "$ompi_pkglibdir"/mca_pmix_ext*.so 2>/dev/null | awk '$1 ~ /^libpmix\.so/ {print $3; exit}')
[[ -n "$pmix_lib" ]] || die "cannot find the PMIx library of Open MPI's mca_pmix component"
pmix_prefix=$(dirname "$(dirname "$(readlink -f "$pmix_lib")")")

stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
mkdir -p "$stage"/{libexec,lib/openmpi,lib/pmix,share,etc}
programs=("lrllm $BUILD/lrllm" "orted $ompi_bindir/orted" "mpirun $ompi_bindir/orterun")
if [[ -f "$BUILD/tests/gpu" && -x "$BUILD/tests/gpu" ]]; then
  programs+=("test_gpu $BUILD/tests/gpu")
else
  echo "pack-device: no $BUILD/tests/gpu; packing without test_gpu"
fi
for p in "${programs[@]}"; do
  read -r name src <<<"$p"
  strip --strip-unneeded -o "$stage/libexec/$name" "$src"
done
cp "$ompi_pkglibdir"/*.so "$stage/lib/openmpi/"
cp "$pmix_prefix"/lib/pmix/*.so "$stage/lib/pmix/"
cp -r "$(ompi_path pkgdatadir)" "$stage/share/openmpi"
cp -r "$pmix_prefix/share" "$stage/share/pmix"
cp -r "$(ompi_path sysconfdir)" "$stage/etc/openmpi"
tokenizer=input/data/tokenizer
if [[ -f "$tokenizer/encoder.json" && -f "$tokenizer/vocab.bpe" ]]; then
  mkdir -p "$stage/tokenizer"
  cp "$tokenizer/encoder.json" "$tokenizer/vocab.bpe" "$stage/tokenizer/"
else
  echo "pack-device: warning: no $tokenizer (make data writes it): lrllm --mode finetune will fail on the device" >&2
fi

# Libraries the device provides (see the top of this file), by soname.
provided='^(linux-vdso|ld-linux-x86-64|libc|libm|libdl|libpthread|librt|libresolv|libutil|libanl|libmvec|libgcc_s'
provided+='|libcuda|libcudart|libcublas|libcublasLt|libnccl)\.so'
cuda_sonames='^lib(cudart|cublas|cublasLt|nccl)\.so'
# ldd lists each file's whole closure, so one pass over the programs and the components finds every library.
mapfile -t elves < <(find "$stage/libexec" "$stage/lib/openmpi" "$stage/lib/pmix" -type f)
declare -A packed=()
cuda_needs=()
while read -r soname arrow path _; do
  [[ "$arrow" == "=>" ]] || continue
  [[ "$path" != "not" ]] || die "$soname, which a packed file needs, is not found on this machine"
  if [[ "$soname" =~ $cuda_sonames ]]; then
    [[ " ${cuda_needs[*]} " == *" $soname "* ]] || cuda_needs+=("$soname")
  elif [[ ! "$soname" =~ $provided && -z "${packed[$soname]:-}" ]]; then
    cp -L "$path" "$stage/lib/$soname"
    packed[$soname]=1
  fi
done < <(for f in "${elves[@]}"; do ldd "$f"; done)
# lrllm opens cuBLASLt itself when a CUDA backend is made (so CPU runs never map it): ldd cannot list it.
cublaslt=$(sed -nE 's/^#define CUBLAS_VER_MAJOR ([0-9]+).*/libcublasLt.so.\1/p' "$(dirname "$(readlink -f "$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)")")/../include/cublas_api.h")
[[ -n "$cublaslt" ]] || die "cannot read CUBLAS_VER_MAJOR from CUDA's cublas_api.h"
cuda_needs+=("$cublaslt")

# Check: with only the pack and CUDA's folders on the library path, every library resolves into the pack or is
# one the device provides.
cuda_dirs=$(ldd "$BUILD/lrllm" | awk -v re="$cuda_sonames" '$1 ~ re {sub("/[^/]*$", "", $3); print $3}' | sort -u |
  paste -sd:)
while read -r f soname path; do
  [[ "$path" == "$stage/lib/"* || "$soname" =~ $provided ]] ||
    die "${f#"$stage"/}: $soname resolves to $path, outside the pack"
done < <(for f in "${elves[@]}" "$stage"/lib/*.so*; do
  LD_LIBRARY_PATH="$stage/lib:$cuda_dirs" ldd "$f" | awk -v f="$f" '$2 == "=>" {print f, $1, $3}'
done)

# The newest glibc symbol version any packed file asks for: the device's glibc must be at least that.
glibc_needed=$(find "$stage/libexec" "$stage/lib" -type f -exec objdump -T {} + 2>/dev/null |
  grep -o 'GLIBC_[0-9][0-9.]*' | sed 's/GLIBC_//' | sort -uV | tail -1)
unpacked_mib=$(du -sb "$stage" | awk '{printf "%.1f", $1 / 1048576}')

rm -rf "$OUT"
mkdir -p "$OUT/bin"
echo "pack-device: compressing $unpacked_mib MiB"
tar -C "$stage" -cf - . | xz -T0 -6 >"$OUT/payload.tar.xz"
hash=$(sha256sum "$OUT/payload.tar.xz" | cut -c1-12)

for p in "${programs[@]}"; do
  read -r name _ <<<"$p"
  cat >"$OUT/bin/$name" <<EOF
#!/usr/bin/env bash
# Runs the packed $name with the pack's libraries, for this program and its children (orted, ranks) alone.
[[ -n "\${LRLLM_ROOT:-}" ]] || source "\$(dirname "\${BASH_SOURCE[0]}")/../env.sh" || exit 1
export LD_LIBRARY_PATH="\$LRLLM_LIBRARY_PATH\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}"
exec "\$LRLLM_ROOT/libexec/$name" "\$@"
EOF
  chmod +x "$OUT/bin/$name"
done

cat >"$OUT/env.sh" <<EOF
# Sourced (bash) on the device machine: the lrllm pack that tools/pack-device.sh wrote on $(date -u +%F) from
# $BUILD (lrllm $(git describe --always --dirty 2>/dev/null || echo '?'),
# Open MPI $(ompi_info --version | awk 'NR == 1 {print $3}')).
# Returns 1 with one line on stderr when the machine lacks what the pack relies on.
LRLLM_PACK=\$(cd "\$(dirname "\${BASH_SOURCE[0]}")" && pwd)
LRLLM_ROOT=\${TMPDIR:-/tmp}/lrllm-pack-$hash
export LRLLM_PACK LRLLM_ROOT
case ":\$PATH:" in *":\$LRLLM_PACK/bin:"*) ;; *) export PATH="\$LRLLM_PACK/bin:\$PATH" ;; esac

# glibc comes from the machine.
_lrllm_glibc=\$(getconf GNU_LIBC_VERSION | awk '{print \$2}')
if [[ \$(printf '%s\n' "$glibc_needed" "\$_lrllm_glibc" | sort -V | sed -n 1p) != "$glibc_needed" ]]; then
  echo "env.sh: this machine's glibc is \$_lrllm_glibc; the pack needs $glibc_needed or newer" >&2
  return 1
fi

# The payload, unpacked once per machine; the marker is written last, so an interrupted unpack is redone.
if [[ ! -f "\$LRLLM_ROOT/.unpacked" ]]; then
  rm -rf "\$LRLLM_ROOT"
  mkdir -p "\$LRLLM_ROOT"
  # filter="data" (where Python has it) refuses odd members and silences 3.12's warning about the default.
  if ! python3 -c 'import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2], **(
      {"filter": "data"} if hasattr(tarfile, "data_filter") else {}))' \\
    "\$LRLLM_PACK/payload.tar.xz" "\$LRLLM_ROOT"; then
    echo "env.sh: cannot unpack \$LRLLM_PACK/payload.tar.xz into \$LRLLM_ROOT" >&2
    return 1
  fi
  touch "\$LRLLM_ROOT/.unpacked"
fi

# CUDA's libraries come from the machine: LRLLM_CUDA_LIB_DIRS (colon-separated) first, then the toolkit
# (nvcc's own), then the usual places, then PyTorch's nvidia wheels.
IFS=: read -r -a _lrllm_search <<<"\${LRLLM_CUDA_LIB_DIRS:-}"
if command -v nvcc >/dev/null; then
  _lrllm_cuda=\$(dirname "\$(dirname "\$(readlink -f "\$(command -v nvcc)")")")
  _lrllm_search+=("\$_lrllm_cuda/lib64" "\$_lrllm_cuda/lib" "\$_lrllm_cuda/targets/x86_64-linux/lib")
fi
_lrllm_search+=(/usr/local/cuda/lib64 /usr/local/cuda/lib /usr/local/cuda/targets/x86_64-linux/lib
  /usr/local/cuda-13*/lib64 /usr/local/cuda-13*/lib /usr/lib/x86_64-linux-gnu)
LRLLM_CUDA_DIRS=
for _lrllm_lib in ${cuda_needs[*]}; do
  _lrllm_dir=
  for _lrllm_d in "\${_lrllm_search[@]}"; do
    if [[ -e "\$_lrllm_d/\$_lrllm_lib" ]]; then _lrllm_dir=\$_lrllm_d; break; fi
  done
  if [[ -z "\$_lrllm_dir" ]]; then
    _lrllm_dir=\$({ python3 -c 'import site; print("\n".join(site.getsitepackages()))' 2>/dev/null || true; } |
      while read -r _lrllm_s; do find "\$_lrllm_s/nvidia" -name "\$_lrllm_lib" 2>/dev/null || true; done | sed -n 1p)
    _lrllm_dir=\${_lrllm_dir%/*}
  fi
  if [[ -z "\$_lrllm_dir" ]]; then
    echo "env.sh: \$_lrllm_lib not found (lrllm was built against CUDA 13; set LRLLM_CUDA_LIB_DIRS to its folder)" >&2
    return 1
  fi
  case ":\$LRLLM_CUDA_DIRS:" in
    *":\$_lrllm_dir:"*) ;;
    *) LRLLM_CUDA_DIRS=\${LRLLM_CUDA_DIRS:+\$LRLLM_CUDA_DIRS:}\$_lrllm_dir ;;
  esac
done
export LRLLM_CUDA_DIRS
# What bin/'s wrappers put on LD_LIBRARY_PATH, for the packed programs alone.
export LRLLM_LIBRARY_PATH="\$LRLLM_ROOT/lib\${LRLLM_CUDA_DIRS:+:\$LRLLM_CUDA_DIRS}"

# Open MPI, relocated into the pack. Each install directory it reads is named, since Debian's layout (libdir
# …/openmpi/lib, components in …/openmpi3) is not what OPAL_PREFIX alone would give. orted, which MPI_Init
# forks even for a single process, is looked up in OPAL_BINDIR: the wrappers.
export OPAL_PREFIX="\$LRLLM_ROOT" OPAL_EXEC_PREFIX="\$LRLLM_ROOT" OPAL_BINDIR="\$LRLLM_PACK/bin"
export OPAL_LIBDIR="\$LRLLM_ROOT/lib" OPAL_PKGLIBDIR="\$LRLLM_ROOT/lib/openmpi"
export OPAL_DATAROOTDIR="\$LRLLM_ROOT/share" OPAL_DATADIR="\$LRLLM_ROOT/share"
export OPAL_PKGDATADIR="\$LRLLM_ROOT/share/openmpi" OPAL_SYSCONFDIR="\$LRLLM_ROOT/etc/openmpi"
# PMIx, Open MPI's process-management layer, has install directories of its own.
export PMIX_PREFIX="\$LRLLM_ROOT" PMIX_EXEC_PREFIX="\$LRLLM_ROOT" PMIX_LIBDIR="\$LRLLM_ROOT/lib"
export PMIX_PKGLIBDIR="\$LRLLM_ROOT/lib/pmix" PMIX_PKGDATADIR="\$LRLLM_ROOT/share/pmix/pmix"
export PMIX_SYSCONFDIR="\$LRLLM_ROOT/share/pmix" PMIX_MCA_mca_base_component_path="\$LRLLM_ROOT/lib/pmix"
# Commands run as root there. One node, no InfiniBand, UCX or ssh: shared memory and self between ranks,
# without the process_vm_readv single copy that containers often forbid, and ranks started on this node only.
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
export OMPI_MCA_btl=self,vader OMPI_MCA_pml=ob1 OMPI_MCA_btl_vader_single_copy_mechanism=none
export OMPI_MCA_plm=isolated
unset _lrllm_glibc _lrllm_search _lrllm_cuda _lrllm_lib _lrllm_dir _lrllm_d _lrllm_s
EOF

# The pack must train here, from an empty environment: MPI_Init (and the orted it forks), HDF5 and OpenBLAS
# from the pack alone. One step of a tiny model on the CPU, from a token file in llm.c's layout (a 256-int32
# header: magic, version, count; then uint16 tokens).
python3 -c 'import struct, sys
n = 4096
header = struct.pack("<256i", 20240520, 1, n, *[0] * 253)
open(sys.argv[1], "wb").write(header + struct.pack(f"<{n}H", *(i % 64 for i in range(n))))' \
  "$stage/tokens.bin"
if ! smoke=$(env -i PATH=/usr/bin:/bin HOME="${HOME:-/root}" bash -c "source '$OUT/env.sh' && lrllm --mode pretrain \
  --device cpu --model.n_layer 1 --model.n_head 1 --model.d_model 8 --model.seq_len 8 --model.vocab_size 64 \
  --train.steps 1 --train.batch_size 1 --train.eval_batches 1 --data.train '$stage/tokens.bin' \
  --run.dir '$stage/smoke'" 2>&1); then
  die "the packed lrllm does not train here: $(grep -E 'error|Error' <<<"$smoke" | tail -1 || tail -1 <<<"$smoke")"
fi

pack_mib=$(du -sb "$OUT" | awk '{printf "%.1f", $1 / 1048576}')
tree_mib=$(git ls-files -co --exclude-standard -z | du -cb --files0-from=- 2>/dev/null |
  awk 'END {printf "%.1f", $1 / 1048576}')
echo "pack-device: ${#packed[@]} libraries, $(find "$stage/lib/openmpi" -name "*.so" | wc -l) Open MPI" \
  "components; the device provides ${cuda_needs[*]} and glibc >= $glibc_needed"
echo "pack-device: $OUT is $pack_mib MiB ($unpacked_mib unpacked); with the working tree ($tree_mib MiB) a device" \
  "call carries $(awk -v a="$pack_mib" -v b="$tree_mib" 'BEGIN {printf "%.1f", a + b}') of $CARRY_LIMIT_MIB MiB"
if awk -v a="$pack_mib" -v b="$tree_mib" -v l="$CARRY_LIMIT_MIB" 'BEGIN {exit !(a + b > l)}'; then
  die "over the $CARRY_LIMIT_MIB MiB a device call carries"
fi
