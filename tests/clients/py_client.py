"""The official MCP Python SDK driving sortie-mcp over stdio (SPEC §14). The SDK validates a
successful tool result's structuredContent against the tool's outputSchema; a result it does
not admit raises. Prints one JSON object with what it saw.

    SORTIE_MCP=/path/to/sortie-mcp DATABASE_URL=... python py_client.py
"""

import asyncio
import json
import os

from mcp import ClientSession, StdioServerParameters
from mcp.client.stdio import stdio_client


async def main() -> None:
    params = StdioServerParameters(
        command=os.environ["SORTIE_MCP"],
        env={"DATABASE_URL": os.environ["DATABASE_URL"], "RUST_LOG": "warn"},
    )
    seen: dict = {"calls": {}}
    with open(os.devnull, "w") as quiet:
        async with stdio_client(params, errlog=quiet) as (read, write):
            async with ClientSession(read, write) as session:
                await session.initialize()
                tools = (await session.list_tools()).tools
                seen["tools"] = [{"name": t.name, "hasOutputSchema": t.output_schema is not None} for t in tools]
                await session.set_logging_level("info")
                seen["setLevel"] = True

                async def call(label: str, name: str, args: dict):
                    try:
                        r = await session.call_tool(name, args)
                        seen["calls"][label] = {
                            "ok": not r.is_error,
                            "isError": bool(r.is_error),
                            "structured": r.structured_content,
                        }
                        return r.structured_content
                    except Exception as e:  # noqa: BLE001 - reported to the test
                        seen["calls"][label] = {"threw": f"{type(e).__name__}: {e}"}
                        return None

                created = await call("create", "create_campaign",
                                     {"goal": "python client", "planner": "none", "request_id": "py-1"})
                await call("create_again", "create_campaign",
                           {"goal": "python client", "planner": "none", "request_id": "py-1"})
                cid = (created or {}).get("id")
                await call("add_steps_as_text", "add_steps",
                           {"campaign_id": cid, "steps": json.dumps([{"action": "a"}, {"action": "b"}])})
                await call("get_campaign", "get_campaign", {"id": cid, "steps_limit": 1})
                await call("get_campaign_by_campaign_id", "get_campaign", {"campaign_id": cid})
                await call("list_campaigns", "list_campaigns", {"limit": 5, "status": None})
                await call("get_updates", "get_updates", {"id": cid})
                await call("claim", "claim_next", {"campaign_id": cid})
                await call("not_found", "get_campaign", {"id": "00000000-0000-4000-8000-000000000000"})
                await call("unknown_parameter", "complete_step", {"step_id": 1, "output": "x"})
                await call("add_note", "add_note", {"campaign_id": cid, "content": "py note", "tags": ["t"]})
                await call("get_notes", "get_notes", {"campaign_id": cid})
                await call("search_notes", "search_notes", {"query": "note", "top_k": 1000})
                await call("list_workflows", "list_workflows", {})
                await call("cancel", "cancel_campaign", {"id": cid})
    print(json.dumps(seen))


asyncio.run(main())
