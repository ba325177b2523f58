-- Strict JSON request bodies for the gateway (Envoy's Lua HTTP filter).
--
-- The transcoder's JSON parser (protobuf's JsonStreamParser) takes more than JSON: strings in
-- single quotes, bare keys, trailing commas, "1.", unknown escapes. And it silently drops JSON
-- body fields the request message does not have (envoyproxy/envoy#46623). So this filter runs
-- just before it: on a REST route whose metadata names the message its body maps to
-- (filter_metadata["envoy.filters.http.lua"].message), it reads the body as RFC 8259 JSON and
-- answers 400 naming the line and column of the first thing that is not JSON, or the first
-- key the message lacks (nested messages included). A top-level array (a client-streaming
-- RPC's messages) is checked element by element.
--
-- What counts as JSON, beyond the grammar: the text must be UTF-8 (RFC 8259 8.1), and a
-- \uD800-\uDFFF escape must be half of a surrogate pair, because protobuf strings are UTF-8
-- and cannot hold a lone surrogate. A key given twice in one object is refused, as is a field
-- given under both its names ("lr" and "learning_rate"): RFC 8259 leaves which one wins to
-- the parser. An empty body (no bytes at all) is no body: the transcoder makes it the empty
-- message, as gRPC-gateway does; a body of only whitespace is not JSON.
--
-- The 400 is a local reply with the message as its text; the connection manager's
-- local_reply_config (gateway/render.py, local_reply_mappers) wraps it in the JSON error
-- envelope.
--
-- It runs on every REST request with a body, so it is one linear pass: each byte is looked at
-- a bounded number of times, strings are skipped with one pattern search per run of plain
-- characters, and numbers are read byte by byte (LuaJIT compiles such loops).
--
-- gateway/render.py generates SCHEMA from the descriptor set and puts it in place of the
-- marker line below. SCHEMA maps each message's full name to {name = ..., keys = {...},
-- fields = {...}}: keys maps every JSON key the transcoder takes (a field's proto name and
-- its json_name, lowerCamelCase unless the proto sets it) to true (a value not checked
-- inside: scalars, enums, well-known types), to the schema of a message-typed field
-- (singular or repeated), or to {map = schema} for a map whose values are messages; fields
-- maps each key to its field's proto name.

local SCHEMA = {} -- @SCHEMA@

local MAX_DEPTH = 32

local byte, char, find, format, sub = string.byte, string.char, string.find, string.format,
  string.sub
local concat, tonumber = table.concat, tonumber

-- Thrown (with error(x, 0)) through the reader and caught by check(): the body is not
-- taken. bad_at is the byte position, and either bad_what what JSON has there ("invalid JSON
-- at line 1, column 2: expected <bad_what>, found <the text there>") or bad_head the message
-- less its position ("<bad_head> at line 1, column 2"), for JSON this gateway refuses.
local BAD = {}
local bad_at, bad_what, bad_head

local function fail(pos, what)
  bad_at, bad_what, bad_head = pos, what, nil
  error(BAD, 0)
end

local function refuse(pos, head)
  bad_at, bad_what, bad_head = pos, nil, head
  error(BAD, 0)
end

-- The first unknown key found in this body, and the message it was found in.
local unknown_key, unknown_in

-- What the character after a backslash stands for; no other character may follow one.
local ESCAPES = {[34] = '"', [47] = "/", [92] = "\\", [98] = "\b", [102] = "\f", [110] = "\n",
  [114] = "\r", [116] = "\t"}

-- The characters that end a run of plain string characters: the closing quote, a backslash,
-- a control character (which must be escaped) and the first byte of a non-ASCII one.
local STRING_STOP = '[%z\1-\31"\\\128-\255]'

local function skip_ws(s, pos)
  local c = byte(s, pos)
  while c == 32 or c == 10 or c == 13 or c == 9 do
    pos = pos + 1
    c = byte(s, pos)
  end
  return pos
end

-- Where the UTF-8 character whose first byte (>= 0x80) is at pos ends, plus one (RFC 3629:
-- no overlong forms, no surrogates, nothing above U+10FFFF).
local function utf8_next(s, pos)
  local c, c2 = byte(s, pos, pos + 1)
  local len, low, high = 0, 0x80, 0xBF
  if c >= 0xC2 and c <= 0xDF then
    len = 2
  elseif c >= 0xE0 and c <= 0xEF then
    len = 3
    if c == 0xE0 then low = 0xA0 elseif c == 0xED then high = 0x9F end
  elseif c >= 0xF0 and c <= 0xF4 then
    len = 4
    if c == 0xF0 then low = 0x90 elseif c == 0xF4 then high = 0x8F end
  end
  if len == 0 or not c2 or c2 < low or c2 > high then fail(pos, "UTF-8 text") end
  for i = pos + 2, pos + len - 1 do
    local cn = byte(s, i)
    if not cn or cn < 0x80 or cn > 0xBF then fail(pos, "UTF-8 text") end
  end
  return pos + len
end

local LONE = "(a lone UTF-16 surrogate is no character)"

-- Reads the string whose opening quote is at pos. Returns the position after its closing
-- quote and whether it holds a backslash escape.
local function string_at(s, pos)
  local i, escaped = pos + 1, false
  while true do
    local at = find(s, STRING_STOP, i)
    if not at then fail(pos, "a closing quote for this string") end
    local c = byte(s, at)
    if c == 34 then return at + 1, escaped end
    if c == 92 then
      escaped = true
      local e = byte(s, at + 1)
      if e == 117 then
        if not find(s, "^%x%x%x%x", at + 2) then
          fail(at, "four hexadecimal digits after \\u")
        end
        local cp = tonumber(sub(s, at + 2, at + 5), 16)
        if cp >= 0xD800 and cp <= 0xDBFF then
          if not find(s, "^\\u[dD][c-fC-F]%x%x", at + 6) then
            fail(at, "\\uDC00-\\uDFFF after \\uD800-\\uDBFF " .. LONE)
          end
          i = at + 12
        elseif cp >= 0xDC00 and cp <= 0xDFFF then
          fail(at, "\\uD800-\\uDBFF before \\uDC00-\\uDFFF " .. LONE)
        else
          i = at + 6
        end
      elseif e and ESCAPES[e] then
        i = at + 2
      else
        fail(at, 'one of the escapes \\" \\\\ \\/ \\b \\f \\n \\r \\t \\uXXXX')
      end
    elseif c >= 128 then
      i = utf8_next(s, at)
    else
      fail(at, "an escape for a control character in a string (such as \\n, \\t, \\u0001)")
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

-- Decodes the escapes of a string's contents (already checked by string_at).
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
      if cp >= 0xD800 and cp <= 0xDBFF then -- a pair, as string_at made sure
        cp = 0x10000 + (cp - 0xD800) * 0x400 + (tonumber(sub(raw, i + 2, i + 5), 16) - 0xDC00)
        i = i + 6
      end
      out[#out + 1] = utf8(cp)
    else
      out[#out + 1] = ESCAPES[c]
      i = b + 2
    end
  end
  return concat(out)
end

local function is_digit(c)
  return c and c >= 48 and c <= 57
end

-- The position after the run of digits at p, which must hold one at least (else the number
-- at pos is reported, as lacking what).
local function digits(s, p, pos, what)
  if not is_digit(byte(s, p)) then fail(pos, what) end
  repeat
    p = p + 1
  until not is_digit(byte(s, p))
  return p
end

-- Reads the number at pos (a "-" or a digit): -?(0|[1-9][0-9]*)(.[0-9]+)?([eE][+-]?[0-9]+)?
local function number(s, pos)
  local p = pos
  if byte(s, p) == 45 then p = p + 1 end
  if byte(s, p) == 48 then
    p = p + 1
    if is_digit(byte(s, p)) then fail(pos, "a number without leading zeros") end
  else
    p = digits(s, p, pos, "a digit after the minus sign")
  end
  local c = byte(s, p)
  if c == 46 then
    p = digits(s, p + 1, pos, "a digit after the decimal point")
    c = byte(s, p)
  end
  if c == 101 or c == 69 then
    c = byte(s, p + 1)
    p = digits(s, (c == 43 or c == 45) and p + 2 or p + 1, pos, "a digit in the exponent")
    c = byte(s, p)
  end
  -- "0x10", "1.2.3", "1e5e5", "12abc": no valid number goes on like this.
  if c and (c == 46 or is_digit(c) or (c >= 65 and c <= 90) or (c >= 97 and c <= 122)) then
    fail(pos, "a decimal number (such as -12, 0.5, 1e-3)")
  end
  return p
end

local value -- function(s, pos, schema, depth): the position after the value at pos

-- The object whose "{" is at pos. schema is a message schema (keys checked), a map marker
-- (values checked) or nil (nothing checked).
local function object(s, pos, schema, depth)
  if depth > MAX_DEPTH then refuse(pos, format("JSON nested deeper than %d levels", MAX_DEPTH)) end
  local keys, fields, values
  if schema then
    keys, fields, values = schema.keys, schema.fields, schema.map
  end
  local seen = {}
  pos = skip_ws(s, pos + 1)
  if byte(s, pos) == 125 then return pos + 1 end
  while true do
    if byte(s, pos) ~= 34 then
      fail(pos, byte(s, pos) == 125
        and "another key after the comma (JSON has no trailing commas)" or "a key in double quotes")
    end
    local after, escaped = string_at(s, pos)
    local key = sub(s, pos + 1, after - 2)
    if escaped then key = unescape(key) end
    local inner = values
    local id = key
    if keys then
      local field = keys[key]
      if field == nil then
        if not unknown_key then unknown_key, unknown_in = key, schema.name end
      else
        id = fields[key]
        if field ~= true then inner = field end
      end
    end
    local first = seen[id]
    if first then
      if first == key then refuse(pos, format('key "%s" given twice in one object', key)) end
      refuse(pos, format('field %s given twice in one object (as "%s" and "%s")', id, first, key))
    end
    seen[id] = key
    pos = skip_ws(s, after)
    if byte(s, pos) ~= 58 then fail(pos, "a colon after the key") end
    pos = skip_ws(s, value(s, skip_ws(s, pos + 1), inner, depth))
    local c = byte(s, pos)
    if c == 125 then return pos + 1 end
    if c ~= 44 then fail(pos, "a comma or } after the value") end
    pos = skip_ws(s, pos + 1)
  end
end

-- The array whose "[" is at pos; each element is checked against schema.
local function array(s, pos, schema, depth)
  if depth > MAX_DEPTH then refuse(pos, format("JSON nested deeper than %d levels", MAX_DEPTH)) end
  pos = skip_ws(s, pos + 1)
  if byte(s, pos) == 93 then return pos + 1 end
  while true do
    if byte(s, pos) == 93 then
      fail(pos, "another value after the comma (JSON has no trailing commas)")
    end
    pos = skip_ws(s, value(s, pos, schema, depth))
    local c = byte(s, pos)
    if c == 93 then return pos + 1 end
    if c ~= 44 then fail(pos, "a comma or ] after the value") end
    pos = skip_ws(s, pos + 1)
  end
end

value = function(s, pos, schema, depth)
  local c = byte(s, pos)
  if c == 34 then return (string_at(s, pos)) end
  if c == 45 or is_digit(c) then return number(s, pos) end
  if c == 123 then return object(s, pos, schema, depth + 1) end
  if c == 91 then return array(s, pos, schema, depth + 1) end
  local c1, c2, c3, c4 = byte(s, pos + 1, pos + 4)
  if c == 116 and c1 == 114 and c2 == 117 and c3 == 101 then return pos + 4 end -- true
  if c == 110 and c1 == 117 and c2 == 108 and c3 == 108 then return pos + 4 end -- null
  if c == 102 and c1 == 97 and c2 == 108 and c3 == 115 and c4 == 101 then -- false
    return pos + 5
  end
  if c == 78 or c == 73 then
    fail(pos, 'a value (NaN and Infinity are no JSON numbers: a float field takes the strings '
      .. '"NaN", "Infinity" and "-Infinity")')
  end
  fail(pos, "a value")
end

-- What is at pos, for an error message: up to 16 characters of the text (as far as they are
-- printable UTF-8), or what the first one is, or the end of the body.
local function found(s, pos)
  if pos > #s then return "the end of the body" end
  local c = byte(s, pos)
  if c < 32 or c == 127 then return format("the control character U+%04X", c) end
  local stop = pos
  for _ = 1, 16 do
    local b = byte(s, stop)
    if not b or b < 32 or b == 127 then break end
    if b < 128 then
      stop = stop + 1
    else
      local ok, after = pcall(utf8_next, s, stop)
      if not ok then break end
      stop = after
    end
  end
  if stop == pos then return format("the byte 0x%02X", c) end
  return '"' .. sub(s, pos, stop - 1) .. (stop <= #s and '..."' or '"')
end

-- Where pos is, as "line L, column C" (columns count bytes from 1).
local function line_and_column(s, pos)
  local line, line_start = 1, 1
  while true do
    local nl = find(s, "\n", line_start, true)
    if not nl or nl >= pos then break end
    line, line_start = line + 1, nl + 1
  end
  return format("line %d, column %d", line, pos - line_start + 1)
end

-- Checks body against the message named message (any name: a message without a schema, as
-- a well-known type, only has its JSON checked). Returns nil when it may go on, else the
-- message of the 400 to answer with.
local function check(body, message)
  local schema = SCHEMA[message]
  unknown_key, unknown_in = nil, nil
  local ok, err = pcall(function()
    local pos = skip_ws(body, 1)
    if pos > #body then fail(pos, "a value (the body is only whitespace)") end
    pos = skip_ws(body, value(body, pos, schema, 0))
    if pos <= #body then fail(pos, "the end of the body after the value") end
  end)
  if not ok then
    if err ~= BAD then error(err, 0) end
    local at, what, head = bad_at, bad_what, bad_head -- found() may set them anew
    local where = line_and_column(body, at)
    if head then return format("%s at %s", head, where) end
    return format("invalid JSON at %s: expected %s, found %s", where, what, found(body, at))
  end
  if unknown_key then
    local key = unknown_key
    if #key > 100 then key = sub(key, 1, 100) .. "..." end
    return format('unknown field "%s" in %s', key, unknown_in)
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
  local ctype = handle:headers():get("content-type")
  if ctype and find(ctype, "^application/grpc") then return end
  local buffer = handle:body()
  if not buffer then return end
  local n = buffer:length()
  if n == 0 then return end
  local answer = check(buffer:getBytes(0, n), message)
  if answer then
    handle:respond({[":status"] = "400", ["content-type"] = "text/plain"}, answer)
  end
end


-- google.api.http response_body, which the transcoder ignores for JSON
-- (envoyproxy/envoy#11136): a REST route whose metadata names response_body gets {"<field>": X}
-- from the transcoder and answers X. render.py allows it only where that field is the
-- response message's one field, so the unwrapped text is exactly X.
--
-- handle:body() yields until the whole body is in, and a headers object fetched before that
-- is dead after it ("object used outside of proper scope"): the headers are read before the
-- body, and only handle:headers() afresh touches them after it. buffer:setBytes() sets
-- content-length itself.
function envoy_on_response(handle)
  local headers = handle:headers()
  local status = headers:get(":status")
  -- A REST body within the gateway's limit can still transcode to a gRPC message over the
  -- services' limit: gRPC says RESOURCE_EXHAUSTED, which the transcoder turns into 429, as if
  -- the caller were rate limited. It is 413, as for a body over the gateway's own limit.
  if status == "429" then
    local buffer = handle:body()
    if buffer and find(buffer:getBytes(0, buffer:length()), "Received message larger than max",
      1, true) then
      handle:headers():replace(":status", "413")
    end
    return
  end
  if status ~= "200" then return end
  local carried = handle:streamInfo():dynamicMetadata():get("mlmesh")
  local field = carried and carried["response_body"]
  if not field then return end
  local ctype = headers:get("content-type")
  if not ctype or not find(ctype, "^application/json") then return end
  local buffer = handle:body()
  if not buffer then return end
  local text = buffer:getBytes(0, buffer:length())
  local prefix = '{"' .. field .. '":'
  if sub(text, 1, #prefix) == prefix and sub(text, -1) == "}" then
    buffer:setBytes(sub(text, #prefix + 1, -2))
  end
end
