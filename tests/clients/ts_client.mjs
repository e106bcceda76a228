// The official MCP TypeScript SDK driving sortie-mcp over stdio (SPEC §14). The SDK validates
// every tool's structuredContent against its outputSchema by itself, error results included:
// a result it does not admit makes callTool throw. Prints one JSON object with what it saw.
//
//   SORTIE_MCP=/path/to/sortie-mcp DATABASE_URL=... node ts_client.mjs
import { Client } from "@modelcontextprotocol/sdk/client/index.js";
import { StdioClientTransport } from "@modelcontextprotocol/sdk/client/stdio.js";

const env = { ...process.env, RUST_LOG: "warn" };
const transport = new StdioClientTransport({ command: process.env.SORTIE_MCP, args: [], env, stderr: "ignore" });
const client = new Client({ name: "sortie-ts-test", version: "0" });
await client.connect(transport);

const seen = { tools: [], calls: {} };
const { tools } = await client.listTools();
seen.tools = tools.map((t) => ({ name: t.name, hasOutputSchema: !!t.outputSchema }));

async function call(label, name, args) {
  try {
    const r = await client.callTool({ name, arguments: args });
    seen.calls[label] = { ok: !r.isError, isError: !!r.isError, structured: r.structuredContent ?? null };
    return r.structuredContent;
  } catch (e) {
    seen.calls[label] = { threw: String(e && e.message ? e.message : e) };
    return null;
  }
}

await client.setLoggingLevel("debug");
seen.setLevel = true;
const created = await call("create", "create_campaign", { goal: "ts client \ud83d", planner: "none", request_id: "ts-1" });
await call("create_again", "create_campaign", { goal: "ts client \ud83d", planner: "none", request_id: "ts-1" });
const id = created && created.id;
await call("add_steps_as_text", "add_steps", { campaign_id: id, steps: JSON.stringify([{ action: "a" }, { action: "b" }]) });
await call("get_campaign", "get_campaign", { id, steps_limit: 1 });
await call("get_campaign_by_campaign_id", "get_campaign", { campaign_id: id });
await call("list_campaigns", "list_campaigns", { limit: 5, status: null });
await call("get_updates", "get_updates", { id });
await call("claim", "claim_next", { campaign_id: id });
await call("not_found", "get_campaign", { id: "00000000-0000-4000-8000-000000000000" });
await call("unknown_parameter", "complete_step", { step_id: 1, output: "x" });
await call("type_error", "add_steps", { campaign_id: id, steps: 5 });
await call("add_note", "add_note", { campaign_id: id, content: "ts note", tags: ["t"] });
await call("get_notes", "get_notes", { campaign_id: id });
await call("search_notes", "search_notes", { query: "note", top_k: 1000 });
await call("list_workflows", "list_workflows", {});
await call("cancel", "cancel_campaign", { id });
console.log(JSON.stringify(seen));
await client.close();
