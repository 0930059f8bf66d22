// Validates prometheus-operator objects (JSON list on stdin) with the CRD schemas of @kubernetes-models/prometheus-operator.
// tests/test_helm_render.py copies it next to that package (installed with npm into a cache) and runs it with node.
import { readFileSync } from "node:fs";
const docs = JSON.parse(readFileSync(0, "utf8"));
let failed = 0;
for (const doc of docs) {
  const mod = await import(`@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/${doc.kind}`);
  try { new mod[doc.kind](doc).validate(); console.log(`ok ${doc.kind}`); }
  catch (e) { failed++; console.log(`invalid ${doc.kind}: ${e.message}`); }
}
process.exit(failed ? 1 : 0);
