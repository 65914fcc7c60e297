# Sourced by benches/peers.sh, q4.sh, moe.sh and x86-64-v3.sh: the peers' Python side in one virtual
# environment (target/peers-venv) with the versions pinned in peers/requirements.txt,
# llama-cpp-python (LLAMA_CPP_PYTHON, default 0.3.36) built from its source for this CPU
# (GGML_NATIVE; several minutes on first use), and llama.cpp's converter and tokenizer-test
# vocabularies unpacked from that source. Sets venv, py, work, lcp and llama, and defines
# `convert CHECKPOINT DTYPE` and `host_line`.
lcp=${LLAMA_CPP_PYTHON:-0.3.36}
venv=target/peers-venv
work=target/peers
py=$venv/bin/python
mkdir -p $work
[ -x $py ] || python3 -m venv $venv
$venv/bin/pip install -q -r benches/peers/requirements.txt
# llama-cpp-python from its source distribution, which also carries llama.cpp's converter
# and the vocabulary files of its tokenizer tests (the checkpoints' tokenizers).
sdist=$work/llama_cpp_python-$lcp.tar.gz
if [ ! -f "$sdist" ]; then
    $venv/bin/pip download -q --no-deps --no-binary llama-cpp-python "llama-cpp-python==$lcp" -d $work
fi
if ! $py -c "import llama_cpp, sys; sys.exit(llama_cpp.__version__ != '$lcp')" 2>/dev/null; then
    CMAKE_ARGS="-DGGML_NATIVE=ON -DLLAVA_BUILD=OFF" $venv/bin/pip install -q --force-reinstall --no-deps "$sdist"
    $venv/bin/pip install -q numpy diskcache jinja2 typing-extensions
fi
llama=$work/llama.cpp-$lcp
if [ ! -f $llama/convert_hf_to_gguf.py ]; then
    mkdir -p $llama
    v=llama_cpp_python-$lcp/vendor/llama.cpp
    tar -xzf "$sdist" -C $llama --strip-components=3 $v/convert_hf_to_gguf.py $v/conversion $v/gguf-py \
        $v/models/ggml-vocab-gpt-2.gguf $v/models/ggml-vocab-llama-spm.gguf
fi
# `convert CK D`: CK-D.gguf, llama.cpp's convert_hf_to_gguf.py of the checkpoint folder CK
# with matrices in D (f32, f16, q8_0), made again when the checkpoint is newer.
convert() {
    local out=$1-$2.gguf
    [ -f "$out" ] && [ "$out" -nt "$1/model.safetensors" ] && return
    $py $llama/convert_hf_to_gguf.py "$1" --outtype $2 --outfile "$out.part" >/dev/null 2>&1 ||
        { echo "convert_hf_to_gguf.py failed on $1 ($2)" >&2; exit 1; }
    mv "$out.part" "$out"
}
# `host_line`: the host's CPU model and cores, the date and the commit, for a table's header.
host_line() {
    local model
    model=$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -n 1)
    echo "host: $model, $(nproc) cores; run $(date -u +%Y-%m-%d), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
}
