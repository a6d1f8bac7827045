# lrllm: one entry point. `make run` and `make test` install what is missing first.
SHELL := /bin/bash
.DEFAULT_GOAL := all

BUILD ?= build
# V=1 shows the full compiler command lines.
Q := $(if $(filter 1,$(V)),,@)
SANITIZE ?= 0
NVCC ?= $(shell command -v nvcc 2>/dev/null || ls /usr/local/cuda/bin/nvcc 2>/dev/null)
# nvcc alone is not enough: some images ship the compiler without the shared runtime and cuBLAS, so the
# CUDA build needs both libraries, wherever this toolkit's layout puts them.
CUDA_HOME := $(patsubst %/bin/nvcc,%,$(realpath $(NVCC)))
CUDA_LIB_DIR := $(firstword $(foreach d,$(CUDA_HOME)/lib64 $(CUDA_HOME)/lib $(CUDA_HOME)/targets/x86_64-linux/lib \
                  /usr/lib/x86_64-linux-gnu,$(if $(and $(wildcard $(d)/libcudart.so),$(wildcard $(d)/libcublas.so),$(wildcard $(d)/libcublasLt.so)),$(d))))
# NCCL carries device tensors between ranks; it ships with the toolkit here, or as Debian's libnccl-dev.
NCCL_LIB_DIR := $(firstword $(foreach d,$(CUDA_LIB_DIR) $(CUDA_HOME)/lib /usr/lib/x86_64-linux-gnu,$(if $(wildcard $(d)/libnccl.so),$(d))))
CUDA ?= $(if $(and $(NVCC),$(CUDA_LIB_DIR),$(NCCL_LIB_DIR)),1,0)
CUDA_ARCH ?= sm_90
JOBS ?= $(shell nproc)

# Libraries come from pkg-config (their .pc names below), and every variable can be given instead, e.g. on a
# cluster after `module load hdf5 openblas`: make HDF5_CFLAGS="-I$HDF5_ROOT/include" HDF5_LIBS="-L$HDF5_ROOT/lib
# -lhdf5" BLAS_PKG=openblas PKG_CONFIG_PATH=$OPENBLAS_ROOT/lib/pkgconfig (README, "Building without root").
# Vendor headers are system headers, so their warnings are not ours.
PKG_CONFIG ?= pkg-config
pkg = $(shell $(PKG_CONFIG) $(1) 2>/dev/null)
# The compiler's own include directories stay out: as -isystem they would reorder its #include_next chain.
MULTIARCH := $(shell $(CXX) -print-multiarch 2>/dev/null)
system_includes = $(patsubst -I%,-isystem %,$(filter-out -I/usr/include -I/usr/include/$(MULTIARCH),$(1)))
comma := ,
# The C API only (the deprecated MPI C++ bindings do not compile cleanly under -Werror).
MPICC ?= mpicc
MPI_CFLAGS ?= $(call system_includes,$(shell $(MPICC) --showme:compile 2>/dev/null)) -DOMPI_SKIP_MPICXX
MPI_LIBS ?= $(shell $(MPICC) --showme:link 2>/dev/null)
HDF5_PKG ?= hdf5-openmpi
HDF5_CFLAGS ?= $(call system_includes,$(call pkg,--cflags $(HDF5_PKG)))
HDF5_LIBS ?= $(call pkg,--libs $(HDF5_PKG))
# Debian's openblas.pc names the OpenMP build; the rpath keeps that build at run time whatever the system's
# alternative for libopenblas.so.0 is.
BLAS_PKG ?= openblas
BLAS_LIBDIR ?= $(call pkg,--variable=libdir $(BLAS_PKG))
BLAS_CFLAGS ?= $(call system_includes,$(call pkg,--cflags $(BLAS_PKG) lapacke))
BLAS_LIBS ?= $(call pkg,--libs $(BLAS_PKG) lapacke) $(if $(BLAS_LIBDIR),-Wl$(comma)-rpath$(comma)$(BLAS_LIBDIR))
PCRE_CFLAGS ?= $(call system_includes,$(call pkg,--cflags libpcre2-8))
PCRE_LIBS ?= $(or $(call pkg,--libs libpcre2-8),-lpcre2-8)
JSON_CFLAGS ?= $(call system_includes,$(call pkg,--cflags nlohmann_json))
GTEST_LIBS ?= $(or $(call pkg,--libs gtest_main),-lgtest_main -lgtest -pthread)
# Boost ships no pkg-config file.
BOOST_CFLAGS ?=
BOOST_LIBS ?= -lboost_program_options

CXXFLAGS := -std=c++20 -O2 -march=x86-64-v3 -g -fopenmp -Wall -Wextra -Werror -Iinclude \
            $(MPI_CFLAGS) $(HDF5_CFLAGS) $(BLAS_CFLAGS) $(PCRE_CFLAGS) $(JSON_CFLAGS) $(BOOST_CFLAGS) -MMD -MP
LDLIBS := $(HDF5_LIBS) $(BLAS_LIBS) $(PCRE_LIBS) $(BOOST_LIBS) $(MPI_LIBS) -fopenmp -pthread
ifeq ($(SANITIZE),1)
  BUILD := build-sanitize
  CXXFLAGS += -fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined
  LDLIBS += -fsanitize=address,undefined
endif

LIB_SRCS := $(wildcard src/*/*.cpp)
LIB_OBJS := $(LIB_SRCS:src/%.cpp=$(BUILD)/obj/%.o)
CUDA_SRCS := $(wildcard cuda/*.cu)
ifeq ($(CUDA),1)
  CUDA_OBJS := $(CUDA_SRCS:cuda/%.cu=$(BUILD)/obj/cuda/%.o)
  CXXFLAGS += -DLRLLM_WITH_CUDA
  CXXFLAGS += -isystem $(CUDA_HOME)/include
  LDLIBS += -L$(CUDA_LIB_DIR) -Wl,-rpath,$(CUDA_LIB_DIR) -L$(NCCL_LIB_DIR) -Wl,-rpath,$(NCCL_LIB_DIR) \
            -lcudart -lnccl -ldl
  NVCCFLAGS := -std=c++20 -O3 -arch=$(CUDA_ARCH) -Iinclude -DLRLLM_WITH_CUDA $(MPI_CFLAGS) -MMD -MP \
               --compiler-options -Wall,-Wextra,-Werror
endif
GPU_TEST_SRCS := $(wildcard tests/gpu/*.cpp)
GPU_TEST_OBJS := $(GPU_TEST_SRCS:tests/gpu/%.cpp=$(BUILD)/obj/tests/gpu/%.o)
# The GPU tests build wherever the CUDA backend does, so CI catches GPU code that does not compile.
GPU_TEST_BIN := $(if $(filter 1,$(CUDA)),$(BUILD)/tests/gpu)
TEST_SRCS := $(filter-out tests/tokenizer_dump.cpp tests/grad_dump.cpp,$(wildcard tests/*.cpp))
TEST_OBJS := $(TEST_SRCS:tests/%.cpp=$(BUILD)/obj/tests/%.o)

.PHONY: all build deps data run test test-gpu pack-device bench bench-llama lowrank-study clean format
.SECONDARY:
all: $(BUILD)/lrllm $(BUILD)/tests/unit $(BUILD)/tests/tokenizer_dump $(BUILD)/tests/grad_dump \
     $(BUILD)/tools/bench_sgemm $(GPU_TEST_BIN)

deps:
	@bash tools/install-deps.sh

# The CPU kernels want -O3's loop vectorisation, and -fno-trapping-math so that clamps and other float
# comparisons become vector selects instead of branches (lrllm never reads floating-point exception flags).
# The rest stays at -O2: GCC 12 reports false -Wrestrict positives in std::string code at -O3.
$(BUILD)/obj/backend/backend_cpu.o: CXXFLAGS += -O3 -fno-trapping-math
$(BUILD)/obj/%.o: src/%.cpp
	@mkdir -p $(dir $@)
	@echo "  CXX   $<"
	$(Q)$(CXX) $(CXXFLAGS) -c $< -o $@
$(BUILD)/obj/tests/%.o: tests/%.cpp
	@mkdir -p $(dir $@)
	@echo "  CXX   $<"
	$(Q)$(CXX) $(CXXFLAGS) -c $< -o $@
$(BUILD)/obj/tools/%.o: tools/%.cpp
	@mkdir -p $(dir $@)
	@echo "  CXX   $<"
	$(Q)$(CXX) $(CXXFLAGS) -c $< -o $@
$(BUILD)/tools/%: $(BUILD)/obj/tools/%.o $(BUILD)/liblrllm.a
	@mkdir -p $(dir $@)
	@echo "  LINK  $@"
	$(Q)$(CXX) $(CXXFLAGS) $^ -o $@ $(LDLIBS)
$(BUILD)/obj/cuda/%.o: cuda/%.cu
	@mkdir -p $(dir $@)
	@echo "  NVCC  $<"
	$(Q)$(NVCC) $(NVCCFLAGS) -c $< -o $@

$(BUILD)/liblrllm.a: $(LIB_OBJS) $(CUDA_OBJS)
	@rm -f $@
	$(Q)ar rcs $@ $^
$(BUILD)/lrllm: $(BUILD)/obj/main.o $(BUILD)/liblrllm.a
	@echo "  LINK  $@"
	$(Q)$(CXX) $(CXXFLAGS) $^ -o $@ $(LDLIBS)
$(BUILD)/tests/unit: $(TEST_OBJS) $(BUILD)/liblrllm.a
	@mkdir -p $(dir $@)
	@echo "  LINK  $@"
	$(Q)$(CXX) $(CXXFLAGS) $^ -o $@ $(GTEST_LIBS) $(LDLIBS)
$(BUILD)/tests/gpu: $(GPU_TEST_OBJS) $(BUILD)/liblrllm.a
	@mkdir -p $(dir $@)
	@echo "  LINK  $@"
	$(Q)$(CXX) $(CXXFLAGS) $^ -o $@ $(GTEST_LIBS) $(LDLIBS)
$(BUILD)/tests/%: $(BUILD)/obj/tests/%.o $(BUILD)/liblrllm.a
	@mkdir -p $(dir $@)
	@echo "  LINK  $@"
	$(Q)$(CXX) $(CXXFLAGS) $^ -o $@ $(LDLIBS)

# The entry points install dependencies first, then build in a fresh make, whose flags (from mpicc and the
# installed packages) are read only after the install.
build: deps
	@$(MAKE) --no-print-directory -j$(JOBS) all

data: build
	@bash tools/prepare-data.sh $(BUILD)

test: data
	@bash tests/run.sh $(BUILD)

run: data
	@bash tools/demo.sh $(BUILD)

# The CUDA backend against the CPU backend (tests/gpu); every test skips with a message where no GPU is visible.
test-gpu: build
	@if [ -x $(BUILD)/tests/gpu ]; then $(BUILD)/tests/gpu; \
	 else echo "test-gpu: this build has no CUDA backend (no nvcc, cuBLAS or NCCL found)" >&2; exit 1; fi

# The CUDA build with the libraries and Open MPI runtime a bare GPU machine lacks, in .device/ (git-ignored).
pack-device: build
	@bash tools/pack-device.sh $(BUILD)

bench: data
	@bash tools/bench.sh $(BUILD)

# Dense against the low-rank variants at one shape, each at its own tuned lr (tools/lowrank_study.py). The
# default is a CPU-sized check of minutes; README "Low-rank study" has the GPT-2 124M command for a GPU.
LOWRANK_STUDY ?= --n_layer 2 --d_model 64 --n_head 2 --seq_len 32 --tokens 8192 --batch_size 4 --eval_batches 2 \
                 --lrs 3e-3,1e-2,3e-2 --device cpu
lowrank-study: data
	@/usr/bin/python3 tools/lowrank_study.py --lrllm $(BUILD)/lrllm --out runs/lowrank-study $(LOWRANK_STUDY)

# Llama-2 finetuning memory alone (tools/bench_llama.py): BENCH_LLAMA="7b 13b" for both; minutes a step.
bench-llama: data
	@for size in $(or $(BENCH_LLAMA),7b); do /usr/bin/python3 tools/bench_llama.py $(BUILD) --size $$size || exit 1; done

format:
	clang-format -i include/lrllm/*/*.h src/*.cpp src/*/*.cpp tests/*.cpp tests/gpu/*.cpp cuda/*.cu cuda/*.cuh

clean:
	rm -rf build build-sanitize

-include $(shell find $(BUILD)/obj -name '*.d' 2>/dev/null)
