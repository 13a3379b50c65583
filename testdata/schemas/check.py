#!/usr/bin/env python3
"""Check the JSON Schema test set in this directory.

For every NN-name.json file:
  * the file has exactly the keys description/prompt/schema/valid/invalid;
  * the schema passes Draft202012Validator.check_schema;
  * the schema only uses the subset that llguidance supports (see README.md);
  * every "valid" instance validates (with format checking) and lists object keys in schema order
    (that llguidance's grammars accept them is checked by crates/constraints' tests, token by token);
  * every "invalid" instance fails validation.

Needs: pip install jsonschema rfc3339-validator rfc3986-validator fqdn isoduration
Prints one line per file; exits non-zero on any problem.
"""
import glob
import json
import os
import re
import sys

try:
    import jsonschema
    from jsonschema import Draft202012Validator
except ImportError:
    print("error: the 'jsonschema' package is not installed "
          "(pip install jsonschema rfc3339-validator rfc3986-validator fqdn isoduration)")
    sys.exit(2)

HERE = os.path.dirname(os.path.abspath(__file__))
FORMATS = ["date", "date-time", "time", "email", "uuid", "ipv4", "ipv6", "hostname", "uri", "duration"]

# Keywords llguidance implements, plus the annotations it ignores
# (parser/src/json/schema.rs: IMPLEMENTED and META_AND_ANNOTATIONS).
ALLOWED_KEYWORDS = {
    "anyOf", "oneOf", "allOf", "$ref", "const", "enum", "type",
    "items", "prefixItems", "minItems", "maxItems",
    "properties", "additionalProperties", "patternProperties", "required", "minProperties", "maxProperties",
    "minLength", "maxLength", "pattern", "format",
    "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf",
    "$defs", "$schema", "$id", "$comment", "title", "description", "default", "examples",
}

def resolve(root, schema):
    seen = 0
    while isinstance(schema, dict) and "$ref" in schema:
        ref = schema["$ref"]
        node = root
        for seg in ref[2:].split("/"):
            node = node[seg]
        schema = node
        seen += 1
        if seen > 20:
            raise ValueError("$ref loop")
    return schema


def lint(root):
    """Return a list of problems with the schema w.r.t. the supported subset."""
    problems = []

    def walk(s, path):
        if isinstance(s, bool):
            return
        if not isinstance(s, dict):
            problems.append("%s: schema is not an object or boolean" % path)
            return
        for k in s:
            if k not in ALLOWED_KEYWORDS:
                problems.append("%s: keyword %r not in supported subset" % (path, k))
        if "format" in s and s["format"] not in FORMATS:
            problems.append("%s: format %r not allowed" % (path, s["format"]))
        if "$ref" in s:
            r = s["$ref"]
            if not r.startswith("#/") or "~" in r:
                problems.append("%s: only local '#/...' refs without escapes are allowed: %r" % (path, r))
            else:
                try:
                    resolve(root, s)
                except (KeyError, TypeError, ValueError) as e:
                    problems.append("%s: unresolvable $ref %r (%s)" % (path, r, e))
        if "pattern" in s:
            p = s["pattern"]
            if re.search(r"\(\?<?[=!]|\\[1-9]", p):
                problems.append("%s: pattern uses lookaround or backreference: %r" % (path, p))
            try:
                re.compile(p)
            except re.error as e:
                problems.append("%s: bad pattern %r: %s" % (path, p, e))
        if "multipleOf" in s:
            if s.get("type") != "integer" or not isinstance(s["multipleOf"], int):
                problems.append("%s: multipleOf only on integers with an integer step" % path)
        if ("minProperties" in s or "maxProperties" in s) and "properties" in s:
            if set(s["properties"]) - set(s.get("required", [])):
                problems.append("%s: min/maxProperties with non-required properties" % path)
        if "oneOf" in s:
            branches = s["oneOf"]
            for i, b in enumerate(branches):
                if isinstance(b, dict) and "$ref" in b:
                    problems.append("%s/oneOf/%d: $ref branch (llguidance cannot prove disjointness)" % (path, i))
            for i in range(len(branches)):
                for j in range(i + 1, len(branches)):
                    if not disjoint(branches[i], branches[j]):
                        problems.append("%s/oneOf: branches %d and %d are not provably disjoint" % (path, i, j))
        if "allOf" in s:
            seen = {}
            for i, b in enumerate(s["allOf"]):
                b = resolve(root, b)
                if not isinstance(b, dict) or b.get("type") != "object":
                    problems.append("%s/allOf/%d: branch is not an object schema" % (path, i))
                    continue
                if b.get("additionalProperties", True) is not True:
                    problems.append("%s/allOf/%d: branch restricts additionalProperties" % (path, i))
                for p in b.get("properties", {}):
                    if p in seen:
                        problems.append("%s/allOf: property %r in branches %d and %d" % (path, p, seen[p], i))
                    seen[p] = i
        for k in ("properties", "$defs"):
            for name, sub in s.get(k, {}).items():
                walk(sub, "%s/%s/%s" % (path, k, name))
        for k in ("anyOf", "oneOf", "allOf", "prefixItems"):
            for i, sub in enumerate(s.get(k, [])):
                walk(sub, "%s/%s/%d" % (path, k, i))
        for k in ("items", "additionalProperties"):
            if k in s:
                walk(s[k], "%s/%s" % (path, k))

    walk(root, "#")
    return problems


def disjoint(a, b):
    """Conservative version of llguidance's is_verifiably_disjoint_from."""
    if not (isinstance(a, dict) and isinstance(b, dict)):
        return False
    ta, tb = a.get("type"), b.get("type")
    if "const" in a and "const" in b and ta is None and tb is None:
        return a["const"] != b["const"]
    kind = lambda t: "number" if t in ("integer", "number") else t
    if isinstance(ta, str) and isinstance(tb, str) and kind(ta) != kind(tb):
        return True
    if ta == tb == "object":
        pa, pb = a.get("properties", {}), b.get("properties", {})
        for key in set(a.get("required", [])) | set(b.get("required", [])):
            if key in pa and key in pb and disjoint(pa[key], pb[key]):
                return True
    return False


def branch_schema(root, sub):
    if isinstance(sub, dict) and "$defs" in root:
        return dict(sub, **{"$defs": root["$defs"]})
    return sub


def order_problems(root, schema, inst, path="$"):
    """llguidance emits object keys in schema order: `properties` (allOf branches merged in order) first."""
    out = []
    schema = resolve(root, schema)
    if not isinstance(schema, dict):
        return out
    for k in ("anyOf", "oneOf"):
        if k in schema:
            for b in schema[k]:
                if Draft202012Validator(branch_schema(root, b)).is_valid(inst):
                    out += order_problems(root, b, inst, path)
                    break
    props = {}
    for k in schema:
        if k == "properties":
            for n, sub in schema["properties"].items():
                props.setdefault(n, sub)
        elif k == "allOf":
            for b in schema["allOf"]:
                for n, sub in resolve(root, b).get("properties", {}).items():
                    props.setdefault(n, sub)
    if isinstance(inst, dict):
        order = list(props)
        keys = list(inst)
        known = [k for k in keys if k in props]
        if keys[:len(known)] != known or known != sorted(known, key=order.index):
            out.append("%s: keys %s not in schema order %s" % (path, keys, order))
        for k, v in inst.items():
            sub = props.get(k, schema.get("additionalProperties"))
            if sub is not None:
                out += order_problems(root, sub, v, "%s.%s" % (path, k))
    elif isinstance(inst, list):
        prefix = schema.get("prefixItems", [])
        for i, v in enumerate(inst):
            sub = prefix[i] if i < len(prefix) else schema.get("items")
            if sub is not None:
                out += order_problems(root, sub, v, "%s[%d]" % (path, i))
    return out


def check_file(path):
    problems = []
    with open(path, encoding="utf-8") as fh:
        doc = json.load(fh)
    if not isinstance(doc, dict) or set(doc) != {"description", "prompt", "schema", "valid", "invalid"}:
        return ["file must be an object with keys description, prompt, schema, valid, invalid"], 0
    for k in ("description", "prompt"):
        if not isinstance(doc[k], str) or not doc[k].strip() or "\n" in doc[k]:
            problems.append("%s must be a non-empty single-line string" % k)
    for k in ("valid", "invalid"):
        if not isinstance(doc[k], list) or not doc[k]:
            return problems + ["%s must be a non-empty list" % k], 0
        if len(doc[k]) > 3:
            problems.append("%s must hold 1 to 3 instances" % k)
    schema = doc["schema"]
    try:
        Draft202012Validator.check_schema(schema)
    except jsonschema.exceptions.SchemaError as e:
        return problems + ["schema is not a valid 2020-12 schema: %s" % e.message], 0
    problems += lint(schema)
    std = Draft202012Validator(schema, format_checker=Draft202012Validator.FORMAT_CHECKER)
    for i, inst in enumerate(doc["valid"]):
        errs = list(std.iter_errors(inst))
        if errs:
            problems.append("valid[%d] rejected: %s at %s" % (i, errs[0].message, errs[0].json_path))
            continue
        for p in order_problems(schema, schema, inst):
            problems.append("valid[%d]: %s" % (i, p))
    seen = []
    for i, inst in enumerate(doc["invalid"]):
        if std.is_valid(inst):
            problems.append("invalid[%d] unexpectedly validates" % i)
        if inst in seen:
            problems.append("invalid[%d] duplicates an earlier instance" % i)
        seen.append(inst)
    size = max(len(json.dumps(v, separators=(",", ":"), ensure_ascii=False)) for v in doc["valid"])
    return problems, size


def main():
    missing = [f for f in FORMATS if f not in Draft202012Validator.FORMAT_CHECKER.checkers]
    if missing:
        print("error: jsonschema cannot check formats %s; install rfc3339-validator rfc3986-validator fqdn isoduration"
              % ", ".join(missing))
        return 2
    files = sorted(glob.glob(os.path.join(HERE, "*.json")))
    total = 0
    for n, path in enumerate(files, 1):
        name = os.path.basename(path)
        m = re.fullmatch(r"(\d{2})-[a-z0-9]+(-[a-z0-9]+)*\.json", name)
        problems = []
        if not m:
            problems.append("file name must look like NN-short-name.json")
        elif int(m.group(1)) != n:
            problems.append("expected number %02d (files must be numbered 01, 02, ... without gaps)" % n)
        try:
            more, size = check_file(path)
        except Exception as e:  # malformed JSON, bad $ref, ...
            more, size = ["%s: %s" % (type(e).__name__, e)], 0
        problems += more
        if problems:
            total += len(problems)
            print("FAIL %s" % name)
            for p in problems:
                print("     - %s" % p)
        else:
            print("ok   %-34s (largest valid instance: %d chars)" % (name, size))
    if not files:
        print("no schema files found")
        return 1
    if total:
        print("%d files checked, %d problems" % (len(files), total))
        return 1
    print("%d files checked, all ok" % len(files))
    return 0


if __name__ == "__main__":
    sys.exit(main())
