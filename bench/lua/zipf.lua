-- wrk script: GET PREFIX..k for keys k in [0, KEYS), drawn with a Zipf law of
-- exponent ZIPF_S (key k has weight 1/(k+1)^s: key 0 is the hottest).
-- Environment: KEYS (10000), ZIPF_S (1.0), PREFIX ("/users/").

local keys = tonumber(os.getenv("KEYS") or "") or 10000
local s = tonumber(os.getenv("ZIPF_S") or "") or 1.0
local prefix = os.getenv("PREFIX") or "/users/"

local cdf = {}
local paths = {}

-- Every thread runs this in its own Lua state.
function init(args)
  local total = 0
  for k = 1, keys do
    total = total + 1 / (k ^ s)
    cdf[k] = total
  end
  for k = 1, keys do
    cdf[k] = cdf[k] / total
    paths[k] = wrk.format("GET", prefix .. (k - 1))
  end
  math.randomseed(os.time() + (tonumber(tostring({}):match("0x(%x+)"), 16) or 0) % 100000)
end

-- The first rank whose cumulative weight reaches u.
local function rank(u)
  local lo, hi = 1, keys
  while lo < hi do
    local mid = math.floor((lo + hi) / 2)
    if cdf[mid] < u then lo = mid + 1 else hi = mid end
  end
  return lo
end

function request()
  return paths[rank(math.random())]
end
