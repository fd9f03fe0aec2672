// Validate an AsyncAPI document with the official parser (@asyncapi/parser).
//   node validate.cjs MODULES_DIR DOCUMENT.json
// Prints the parser's diagnostics as JSON lines on stdout; exits 0 when it
// returned a document and reported no error, 1 otherwise.
"use strict";
const fs = require("fs");
const path = require("path");
const { createRequire } = require("module");

const [modules, file] = process.argv.slice(2);
if (!modules || !file) {
  console.error("usage: node validate.cjs MODULES_DIR DOCUMENT.json");
  process.exit(2);
}
const load = createRequire(path.join(path.resolve(modules), "package.json"));
const { Parser } = load("@asyncapi/parser");

(async () => {
  const { document, diagnostics } = await new Parser().parse(fs.readFileSync(file, "utf8"));
  // Severity 0 is an error; 1 warning, 2 information, 3 hint.
  let errors = 0;
  for (const d of diagnostics) {
    if (d.severity === 0) errors += 1;
    console.log(JSON.stringify({ severity: d.severity, code: d.code, path: d.path, message: d.message }));
  }
  process.exit(document && errors === 0 ? 0 : 1);
})().catch((err) => {
  console.error(err && err.stack ? err.stack : String(err));
  process.exit(3);
});
