"""Extract literal test vectors (data only) from the GS1 Syntax Dictionary linter
tests and the GS1 Syntax Engine unit tests into gs1_syntax_vectors.json.

Usage: GS1_SYNTAX_DICTIONARY_GIT=<git dir> GS1_SYNTAX_ENGINE_GIT=<git dir> python tests/data/extract_gs1_vectors.py
Only string literals of the C test calls are kept; none of GS1's code is shipped.
"""
import json
import os
import re
import subprocess


def c_unescape(s):
    out, i = [], 0
    while i < len(s):
        c = s[i]
        if c == '\\':
            n = s[i+1]
            if n == 'x':
                m = re.match(r'[0-9a-fA-F]{1,2}', s[i+2:])
                out.append(chr(int(m.group(0), 16))); i += 2 + len(m.group(0)); continue
            out.append({'n': '\n', 't': '\t', 'r': '\r', '0': '\0', '\\': '\\', '"': '"', "'": "'"}.get(n, '\\' + n))
            i += 2; continue
        out.append(c); i += 1
    return ''.join(out)


def strip_comments(src):
    """Drop // and /* */ comments, but not inside string literals ("https://...")."""
    out, i, n = [], 0, len(src)
    while i < n:
        c = src[i]
        if c == '"':
            j = i + 1
            while j < n and src[j] != '"':
                j += 2 if src[j] == '\\' else 1
            out.append(src[i:j + 1]); i = j + 1
        elif src.startswith('//', i):
            j = src.find('\n', i); i = n if j < 0 else j
        elif src.startswith('/*', i):
            j = src.find('*/', i + 2); i = n if j < 0 else j + 2
        else:
            out.append(c); i += 1
    return ''.join(out)

STR = r'"(?:[^"\\]|\\.)*"'
def args(call):
    # split top-level args; string literals adjacent are concatenated
    toks = re.findall(STR + r'|[^,"\s][^,"]*|,', call)
    res, cur = [], []
    for t in toks:
        if t == ',':
            res.append(cur); cur = []
        else:
            cur.append(t.strip())
    res.append(cur)
    out = []
    for parts in res:
        if parts and all(p.startswith('"') for p in parts):
            out.append(''.join(c_unescape(p[1:-1]) for p in parts))
        else:
            out.append(' '.join(parts))
    return out

def calls(src, name):
    src = strip_comments(src)
    for m in re.finditer(r'\b' + name + r'\((.*?)\);', src, re.S):
        body = m.group(1)
        if '"' not in body:
            continue
        yield args(body)

def git_show(repo, path):
    return subprocess.run(['git', f'--git-dir={repo}', 'show', f'HEAD:{path}'], capture_output=True, text=True, check=True).stdout

# git directories of gs1/gs1-syntax-dictionary and gs1/gs1-syntax-engine (bare clones work)
dic = os.environ.get('GS1_SYNTAX_DICTIONARY_GIT', '/work/.mirror/gs1+gs1-syntax-dictionary/repo')
eng = os.environ.get('GS1_SYNTAX_ENGINE_GIT', '/work/.mirror/gs1+gs1-syntax-engine/repo')
lint = []
files = subprocess.run(['git', f'--git-dir={dic}', 'ls-tree', '-r', '--name-only', 'HEAD', 'src'], capture_output=True, text=True).stdout.split()
for f in sorted(files):
    if not re.search(r'src/lint_[a-z0-9]+\.c$', f):
        continue
    src = git_show(dic, f)
    src = src[src.find('#ifdef UNIT_TESTS'):]
    # vectors for an optional GCP lookup hook are not part of the default linters
    src = re.sub(r'#ifdef GS1_LINTER_CUSTOM\w*.*?#endif', '', src, flags=re.S)
    for a in calls(src, 'UNIT_TEST_PASS'):
        if re.fullmatch(r'gs1_lint_\w+', a[0]) and len(a) == 2 and '"' not in a[1] and a[1] is not None:
            lint.append([a[0][9:], a[1], True, None])
    for a in calls(src, 'UNIT_TEST_FAIL'):
        if re.fullmatch(r'gs1_lint_\w+', a[0]) and len(a) == 4:
            lint.append([a[0][9:], a[1], False, a[2].replace('GS1_LINTER_', '')])

ai = git_show(eng, 'src/c-lib/ai.c')
ai = ai[ai.find('#ifdef UNIT_TESTS'):]
process = [[a[0] == 'true', a[1]] for a in calls(ai, 'test_processAIdata') if a[0] in ('true', 'false')]
parse = [[a[0] == 'true', a[1], a[2]] for a in calls(ai, 'test_parseAIdata') if a[0] in ('true', 'false')]
validate = [[a[0] == 'true', a[1], a[2]] for a in calls(ai, 'test_validateAIs') if a[0] in ('true', 'false')]
table = re.search(r'linter_test_s tests\[\] = \{(.*?)\n\t\};', ai, re.S).group(1)
table = strip_comments(table)
lintai = [[c_unescape(m.group(1)), m.group(2).replace('GS1_LINTER_', '')] for m in re.finditer(r'\{\s*"((?:[^"\\]|\\.)*)"\s*,\s*(\w+)\s*\}', table)]
out = {
    "source": {
        "gs1-syntax-dictionary": subprocess.run(['git', f'--git-dir={dic}', 'rev-parse', 'HEAD'], capture_output=True, text=True).stdout.strip(),
        "gs1-syntax-engine": subprocess.run(['git', f'--git-dir={eng}', 'rev-parse', 'HEAD'], capture_output=True, text=True).stdout.strip(),
        "license": "Apache-2.0 (Copyright GS1 AISBL and contributors); literal test vectors only, extracted by tests/data/extract_gs1_vectors.py",
    },
    "linter_unit_tests": lint,
    "engine_process_ai_data": process,
    "engine_parse_ai_data": parse,
    "engine_validate_ais": validate,
    "engine_linter_ais": lintai,
}
# Digital Link URIs: the engine toggles options between calls, so record the
# state of each option in force for every vector.
dl = git_show(eng, 'src/c-lib/dl.c')
body = dl[dl.find('void test_dl_parseDLuri(void)'):]
body = body[:body.find('#undef test_parseDLuri')]
body = strip_comments(body)
state = {"zero_suppressed_gtin": False, "convenience_alphas": True, "unknown_ais": False}
dlvec = []
for m in re.finditer(r'gs1_encoder_setPermitZeroSuppressedGTINinDLuris\(ctx, (true|false)\)|'
                     r'ctx->permitConvenienceAlphas = (true|false)|'
                     r'gs1_encoder_setPermitUnknownAIs\(ctx, (true|false)\)|'
                     r'test_parseDLuri\((.*?)\);', body, re.S):
    if m.group(1):
        state["zero_suppressed_gtin"] = m.group(1) == "true"
    elif m.group(2):
        state["convenience_alphas"] = m.group(2) == "true"
    elif m.group(3):
        state["unknown_ais"] = m.group(3) == "true"
    else:
        a = args(m.group(4))
        if len(a) == 3 and a[0] in ("true", "false"):
            dlvec.append([a[0] == "true", a[1], a[2], dict(state)])
out["engine_parse_dl_uri"] = dlvec

def dump(obj, path):
    """One vector per line: readable diffs when GS1 adds vectors."""
    lines = ["{"]
    keys = list(obj)
    for k, key in enumerate(keys):
        val = obj[key]
        if isinstance(val, list):
            lines.append(f"{json.dumps(key)}: [")
            lines += [json.dumps(v, ensure_ascii=True) + ("," if i < len(val) - 1 else "") for i, v in enumerate(val)]
            lines.append("]" + ("," if k < len(keys) - 1 else ""))
        else:
            lines.append(f"{json.dumps(key)}: {json.dumps(val, ensure_ascii=True)}" + ("," if k < len(keys) - 1 else ""))
    lines.append("}")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


dump(out, os.path.join(os.path.dirname(os.path.abspath(__file__)), 'gs1_syntax_vectors.json'))
print(len(lint), len(process), len(parse), len(validate), len(lintai), len(dlvec))
