// Argument checks whose messages are built without std::ostream.
//
// TORCH_CHECK formats its message arguments through a std::ostringstream instantiated in the
// calling library. On the H100 image (torch 2.11, extension built with gcc 13) formatting an
// integer that way crashed the process (SIGSEGV inside std::ostream::_M_insert<unsigned long>);
// torch passes a single std::string argument through untouched, so the message is built here
// with std::string and std::to_string and handed over whole.
#pragma once

#include <c10/core/Device.h>
#include <c10/core/ScalarType.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Exception.h>

#include <cstdio>
#include <string>
#include <type_traits>

namespace gradgeom {
namespace detail {

inline void append(std::string& s, const char* v) { s += v; }
inline void append(std::string& s, const std::string& v) { s += v; }
template <typename T, std::enable_if_t<std::is_integral_v<T>, int> = 0>
inline void append(std::string& s, T v) {
  s += std::to_string(v);
}
inline void append(std::string& s, double v) {
  char buf[40];
  std::snprintf(buf, sizeof(buf), "%g", v);
  s += buf;
}
inline void append(std::string& s, c10::ScalarType t) { s += c10::toString(t); }
inline void append(std::string& s, const c10::Device& d) { s += d.str(); }
inline void append(std::string& s, c10::IntArrayRef v) {
  s += "[";
  for (size_t i = 0; i < v.size(); ++i) {
    if (i) s += ", ";
    s += std::to_string(v[i]);
  }
  s += "]";
}

template <typename... Args>
std::string cat(const Args&... args) {
  std::string s;
  (append(s, args), ...);
  return s;
}

}  // namespace detail
}  // namespace gradgeom

#define GG_CHECK(cond, ...) TORCH_CHECK(cond, ::gradgeom::detail::cat(__VA_ARGS__))
#define GG_CHECK_VALUE(cond, ...) TORCH_CHECK_VALUE(cond, ::gradgeom::detail::cat(__VA_ARGS__))
#define GG_CHECK_TYPE(cond, ...) TORCH_CHECK_TYPE(cond, ::gradgeom::detail::cat(__VA_ARGS__))
