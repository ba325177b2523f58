-- Strict JSON request bodies for the gateway (Envoy's Lua HTTP filter).
--
-- grpc_json_transcoder silently drops JSON body fields the request message does not have
-- (envoyproxy/envoy#46623). This filter runs just before it: on a REST route whose metadata
-- names the message the body maps to (filter_metadata["envoy.filters.http.lua"].message), it
-- reads the JSON body and answers 400, in the transcoder's error shape, naming the first
-- unknown key, nested messages included. A body that is not JSON passes untouched, so the
-- transcoder answers it with its own error. A top-level array (a client-streaming RPC's
-- messages) is checked element by element.
--
-- The reader accepts all the transcoder's JSON parser (protobuf's JsonStreamParser) accepts,
-- which is more than JSON: strings in single quotes, unknown escapes ("\x" is "x"), bare
-- keys, trailing commas, and numbers are runs of [0-9.eE+-x]. A body that parser would take
-- must never pass here as "not JSON", or its unknown keys would slip through; the reverse
-- (a body only this reader takes) merely turns the transcoder's 400 into ours.
--
-- gateway/render.py generates SCHEMA from the descriptor set and puts it in place of the
-- marker line below. SCHEMA maps each message's full name to {name = ..., keys = {...}}:
-- keys maps every JSON key the transcoder takes (a field's proto name and its json_name,
-- lowerCamelCase unless the proto sets it) to true (a value not checked inside: scalars, enums, well-known types), to the schema of
-- a message-typed field (singular or repeated), or to {map = schema} for a map whose values
-- are messages.

local SCHEMA = {} -- @SCHEMA@

local MAX_DEPTH = 32

local byte, char, find, sub = string.byte, string.char, string.find, string.sub
local concat, format, tonumber = table.concat, string.format, tonumber

-- Errors thrown (with error(x, 0)) through the reader and caught by check().
local INVALID = {} -- not JSON: leave the body to the transcoder
local TOO_DEEP = {} -- nested deeper than MAX_DEPTH

-- What a backslash and these characters stand for; any other character stands for itself.
local ESCAPES = {[98] = "\b", [102] = "\f", [110] = "\n", [114] = "\r", [116] = "\t", [118] = "\v"}

-- The first unknown key found in this body, and the message it was found in.
local unknown_key, unknown_in

-- Where each of these characters next occurs in the body, at or after the position it was
-- last looked for from (HUGE: nowhere). A plain string.find (memchr) is many times faster
-- than a Lua pattern, which tests each character against a class; remembering the answers
-- keeps a whole scan linear.
local HUGE = math.huge
local MARKS = {'"', "'", "\\", "[", "]", "{"}
local next_at = {}

local function next_of(s, mark, pos)
  local at = next_at[mark]
  if at < pos then
    at = find(s, mark, pos, true) or HUGE
    next_at[mark] = at
  end
  return at
end

local function skip_ws(s, pos)
  local _, e = find(s, "^%s*", pos)
  return e + 1
end

-- Scans the string whose opening quote (" or ') is at pos. Returns the position after its
-- closing quote and whether it holds a backslash escape.
local function scan_string(s, pos)
  local mark = byte(s, pos) == 34 and '"' or "'"
  local i, escaped = pos + 1, false
  while true do
    local q = next_of(s, mark, i)
    if q == HUGE then error(INVALID, 0) end
    local b = next_of(s, "\\", i)
    if q < b then return q + 1, escaped end
    escaped = true
    if byte(s, b + 1) == 117 then
      if not find(s, "^%x%x%x%x", b + 2) then error(INVALID, 0) end
      i = b + 6
    elseif b < #s then
      i = b + 2
    else
      error(INVALID, 0)
    end
  end
end

local function utf8(cp)
  if cp < 0x80 then return char(cp) end
  if cp < 0x800 then return char(0xC0 + math.floor(cp / 0x40), 0x80 + cp % 0x40) end
  if cp < 0x10000 then
    return char(0xE0 + math.floor(cp / 0x1000), 0x80 + math.floor(cp / 0x40) % 0x40,
      0x80 + cp % 0x40)
  end
  return char(0xF0 + math.floor(cp / 0x40000), 0x80 + math.floor(cp / 0x1000) % 0x40,
    0x80 + math.floor(cp / 0x40) % 0x40, 0x80 + cp % 0x40)
end

-- Decodes the escapes of a string's contents (already checked by scan_string).
local function unescape(raw)
  local out, i, n = {}, 1, #raw
  while i <= n do
    local b = find(raw, "\\", i, true)
    if not b then
      out[#out + 1] = sub(raw, i)
      break
    end
    out[#out + 1] = sub(raw, i, b - 1)
    local c = byte(raw, b + 1)
    if c == 117 then
      local cp = tonumber(sub(raw, b + 2, b + 5), 16)
      i = b + 6
      if cp >= 0xD800 and cp <= 0xDBFF and find(raw, "^\\u[dD][c-fC-F]%x%x", i) then
        local lo = tonumber(sub(raw, i + 2, i + 5), 16)
        cp = 0x10000 + (cp - 0xD800) * 0x400 + (lo - 0xDC00)
        i = i + 6
      elseif cp >= 0xD800 and cp <= 0xDFFF then
        cp = 0xFFFD
      end
      out[#out + 1] = utf8(cp)
    else
      out[#out + 1] = ESCAPES[c] or char(c)
      i = b + 2
    end
  end
  return concat(out)
end

local value -- function(s, pos, schema, depth): the position after the value at pos

-- A number at pos (a "-" or digit): as the transcoder's parser, the run of number characters.
local function number(s, pos)
  local _, e = find(s, "^.[%d%.eE%+%-x]*", pos)
  return e + 1
end

-- The object whose "{" is just before pos. schema is a message schema (keys checked), a map
-- marker (values checked) or nil (nothing checked).
local function object(s, pos, schema, depth)
  if depth > MAX_DEPTH then error(TOO_DEEP, 0) end
  local keys, values
  if schema then
    keys = schema.keys
    values = schema.map
  end
  pos = skip_ws(s, pos)
  if byte(s, pos) == 125 then return pos + 1 end
  while true do
    local c, after, escaped, key = byte(s, pos), nil, false, nil
    if c == 34 or c == 39 then
      after, escaped = scan_string(s, pos)
      key = sub(s, pos + 1, after - 2)
    else
      -- A bare key, as the transcoder's parser takes it.
      local _, e = find(s, "^[%a_%$][%w_%$]*", pos)
      if not e then error(INVALID, 0) end
      after, key = e + 1, sub(s, pos, e)
    end
    local inner = values
    if keys then
      if escaped then key = unescape(key) end
      local field = keys[key]
      if field == nil then
        if not unknown_key then unknown_key, unknown_in = key, schema.name end
      elseif field ~= true then
        inner = field
      end
    end
    pos = skip_ws(s, after)
    if byte(s, pos) ~= 58 then error(INVALID, 0) end
    pos = value(s, skip_ws(s, pos + 1), inner, depth)
    pos = skip_ws(s, pos)
    c = byte(s, pos)
    if c == 44 then
      pos = skip_ws(s, pos + 1)
      if byte(s, pos) == 125 then return pos + 1 end -- a trailing comma
    elseif c == 125 then
      return pos + 1
    else
      error(INVALID, 0)
    end
  end
end

-- The array whose "[" is just before pos; each element is checked against schema.
local function array(s, pos, schema, depth)
  if depth > MAX_DEPTH then error(TOO_DEEP, 0) end
  pos = skip_ws(s, pos)
  local c = byte(s, pos)
  if c == 93 then return pos + 1 end
  if c ~= 123 and c ~= 91 and c ~= 34 and c ~= 39 then
    -- Scalars first, as the numbers of /predict: if no string, object or array opens before
    -- the next "]", the array holds no key to check, so it is skipped whole. (Whether its
    -- scalars are well formed is the transcoder's business.)
    local close = next_of(s, "]", pos)
    if close < next_of(s, '"', pos) and close < next_of(s, "{", pos)
      and close < next_of(s, "[", pos) and close < next_of(s, "'", pos) then
      return close + 1
    end
  end
  while true do
    pos = skip_ws(s, value(s, pos, schema, depth))
    c = byte(s, pos)
    if c == 44 then
      pos = skip_ws(s, pos + 1)
      if byte(s, pos) == 93 then return pos + 1 end -- a trailing comma
    elseif c == 93 then
      return pos + 1
    else
      error(INVALID, 0)
    end
  end
end

value = function(s, pos, schema, depth)
  local c = byte(s, pos)
  if c == 123 then return object(s, pos + 1, schema, depth + 1) end
  if c == 91 then return array(s, pos + 1, schema, depth + 1) end
  if c == 34 or c == 39 then return (scan_string(s, pos)) end
  if c == 116 then
    if sub(s, pos, pos + 3) == "true" then return pos + 4 end
  elseif c == 102 then
    if sub(s, pos, pos + 4) == "false" then return pos + 5 end
  elseif c == 110 then
    if sub(s, pos, pos + 3) == "null" then return pos + 4 end
  elseif c == 45 or (c and c >= 48 and c <= 57) then
    return number(s, pos)
  end
  error(INVALID, 0)
end

-- A JSON string literal of text: quotes, backslashes and control bytes escaped, bytes that
-- are not UTF-8 replaced.
local function quote(text)
  local out, i, n = {}, 1, #text
  while i <= n do
    local b = byte(text, i)
    local len = b < 0x80 and 1 or b >= 0xC2 and b < 0xE0 and 2 or b >= 0xE0 and b < 0xF0 and 3
      or b >= 0xF0 and b < 0xF5 and 4 or 0
    if len == 1 then
      if b == 34 or b == 92 then
        out[#out + 1] = "\\" .. char(b)
      elseif b < 32 or b == 127 then
        out[#out + 1] = format("\\u%04x", b)
      else
        out[#out + 1] = char(b)
      end
      i = i + 1
    elseif len > 1 and i + len - 1 <= n
      and find(sub(text, i + 1, i + len - 1), "^[\128-\191]+$") then
      out[#out + 1] = sub(text, i, i + len - 1)
      i = i + len
    else
      out[#out + 1] = "\\ufffd"
      i = i + 1
    end
  end
  return '"' .. concat(out) .. '"'
end

local function invalid_argument(message)
  return '{"code":3,"message":' .. quote(message) .. ',"details":[]}'
end

-- Checks body against the message named message. Returns nil when it may go on (all keys
-- known, or not JSON), else the JSON of the error to answer with.
local function check(body, message)
  local schema = SCHEMA[message]
  if not schema then return nil end
  unknown_key, unknown_in = nil, nil
  for _, mark in ipairs(MARKS) do next_at[mark] = 0 end
  local ok, err = pcall(function()
    local pos = skip_ws(body, 1)
    local c = byte(body, pos)
    if c == 91 then
      pos = array(body, pos + 1, schema, 1)
    elseif c == 123 then
      pos = object(body, pos + 1, schema, 1)
    else
      error(INVALID, 0)
    end
    if skip_ws(body, pos) <= #body then error(INVALID, 0) end
  end)
  if not ok then
    if err == TOO_DEEP then
      return invalid_argument(format("JSON body nests deeper than %d levels", MAX_DEPTH))
    end
    if err ~= INVALID then error(err, 0) end
    return nil
  end
  if unknown_key then
    local key = unknown_key
    if #key > 100 then key = sub(key, 1, 100) .. "..." end
    return invalid_argument(format('unknown field "%s" in %s', key, unknown_in))
  end
  return nil
end

function envoy_on_request(handle)
  -- The router re-selects the route by RPC path after transcoding, so the response side
  -- cannot read this REST route's metadata: carry response_body over in the stream's own.
  local response_body = handle:metadata():get("response_body")
  if response_body then
    handle:streamInfo():dynamicMetadata():set("mlmesh", "response_body", response_body)
  end
  local message = handle:metadata():get("message")
  if not message then return end
  local headers = handle:headers()
  local ctype = headers:get("content-type")
  if ctype and find(ctype, "^application/grpc") then return end
  local buffer = handle:body()
  if not buffer then return end
  local n = buffer:length()
  if n == 0 then return end
  local answer = check(buffer:getBytes(0, n), message)
  if answer then
    handle:respond({[":status"] = "400", ["content-type"] = "application/json"}, answer)
  end
end


-- google.api.http response_body, which the transcoder ignores for JSON
-- (envoyproxy/envoy#11136): a REST route whose metadata names response_body gets {"<field>": X}
-- from the transcoder and answers X. render.py allows it only where that field is the
-- response message's one field, so the unwrapped text is exactly X.
function envoy_on_response(handle)
  -- A REST body within the gateway's limit can still transcode to a gRPC message over the
  -- services' limit: gRPC says RESOURCE_EXHAUSTED, which the transcoder turns into 429, as if
  -- the caller were rate limited. It is 413, as for a body over the gateway's own limit.
  if handle:headers():get(":status") == "429" then
    local buffer = handle:body()
    if buffer and find(buffer:getBytes(0, buffer:length()), "Received message larger than max",
      1, true) then
      handle:headers():replace(":status", "413")
    end
    return
  end
  local carried = handle:streamInfo():dynamicMetadata():get("mlmesh")
  local field = carried and carried["response_body"]
  if not field then return end
  local headers = handle:headers()
  if headers:get(":status") ~= "200" then return end
  local ctype = headers:get("content-type")
  if not ctype or not find(ctype, "^application/json") then return end
  local buffer = handle:body()
  if not buffer then return end
  local text = buffer:getBytes(0, buffer:length())
  local prefix = '{"' .. field .. '":'
  if sub(text, 1, #prefix) == prefix and sub(text, -1) == "}" then
    local inner = sub(text, #prefix + 1, -2)
    buffer:setBytes(inner)
    headers:replace("content-length", tostring(#inner))
  end
end
