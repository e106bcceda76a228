"""An agent CLI's way of starting MCP servers (SPEC §15): read an `mcpServers` config file and
start its `sortie` entry with the official MCP Python SDK, passing the server nothing but the
entry's own `env` (the SDK adds only its few default variables such as PATH and HOME). Calls
get_my_context with no arguments and prints its structured result as one JSON line.

    python py_config_client.py "$SORTIE_MCP_CONFIG"
"""

import asyncio
import json
import os
import sys

from mcp import ClientSession, StdioServerParameters
from mcp.client.stdio import stdio_client


async def main() -> None:
    with open(sys.argv[1]) as f:
        entry = json.load(f)["mcpServers"]["sortie"]
    params = StdioServerParameters(
        command=entry["command"], args=entry.get("args", []), env=entry.get("env", {})
    )
    with open(os.devnull, "w") as quiet:
        async with stdio_client(params, errlog=quiet) as (read, write):
            async with ClientSession(read, write) as session:
                await session.initialize()
                result = await session.call_tool("get_my_context", {})
                print(json.dumps({"isError": bool(result.is_error), "context": result.structured_content}))


asyncio.run(main())
